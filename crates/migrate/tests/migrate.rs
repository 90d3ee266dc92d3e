//! Whole migrations through the library API, in one process over loopback: both devices are
//! `ferry-migrate` handles with their own state folders (`FerryDirs::under`), the sender on
//! 127.0.0.1 without mDNS. Each test checks real outcomes: the destination equals the source
//! (`assert_histories_equal`), re-hashes to the sender's root (`verify_dest`), and the
//! summaries, events and error kinds say what happened.
//!
//! Interruptions land mid-transfer deterministically: the sender is rate-limited so that a
//! history of a few MiB takes seconds, and the interruption is triggered by the receiver's
//! first `progress` event past 30 %.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use ferry_migrate::{
    Error, ErrorKind, Event, Events, Handle, Migration, ReceiveBuilder, ReceiveSummary,
    SendBuilder, SendSummary,
};
use ferry_sync::store::verify_dest;
use ferry_testkit::{assert_histories_equal, generate, HistorySpec};
use ferry_transport::{FerryDirs, Ticket};
use tokio::task::JoinHandle;

const MIB: u64 = 1 << 20;
/// Every wait in these tests: generous, so a loaded machine slows them down without failing
/// them.
const LONG: Duration = Duration::from_secs(120);
/// The sender's rate cap in tests that interrupt a transfer: 8 MiB take about four seconds,
/// far longer than the time between seeing a progress event and acting on it.
const SLOW: u64 = 2 * MIB;

/// Two devices on one machine: a history on the old one, an empty destination on the new one,
/// separate state folders.
struct Lab {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    dest: PathBuf,
    old: FerryDirs,
    new: FerryDirs,
}

impl Lab {
    fn new(size: u64, seed: u64) -> anyhow::Result<Lab> {
        let tmp = tempfile::Builder::new()
            .prefix("ferry-migrate-")
            .tempdir()?;
        let src = tmp.path().join("old").join("history");
        let dest = tmp.path().join("new").join("history");
        let spec = HistorySpec {
            seed,
            ..HistorySpec::with_size(size)
        };
        generate(&src, &spec)?;
        Ok(Lab {
            old: FerryDirs::under(tmp.path().join("old").join("ferry")),
            new: FerryDirs::under(tmp.path().join("new").join("ferry")),
            _tmp: tmp,
            src,
            dest,
        })
    }

    /// A sender of the history on 127.0.0.1 (`port` 0: any), without mDNS.
    fn sender(&self, port: u16) -> SendBuilder {
        Migration::send(&self.src)
            .dirs(self.old.clone())
            .listen(SocketAddr::from(([127, 0, 0, 1], port)))
            .mdns(false)
            .name("old device")
    }

    /// A receiver into the destination; it gives up a minute after losing its sender.
    fn receiver(&self) -> ReceiveBuilder {
        Migration::receive(&self.dest)
            .dirs(self.new.clone())
            .name("new device")
            .give_up_after(Duration::from_secs(60))
    }

    /// The destination equals the source and re-hashes to `root`.
    fn check_dest(&self, root: &ferry_sync::manifest::ChunkHash) -> anyhow::Result<()> {
        let report = verify_dest(&self.dest)?;
        ensure!(
            report.mismatched.is_empty(),
            "paths that do not match the receipt: {:?}",
            report.mismatched
        );
        ensure!(
            report.root == *root,
            "the destination's receipt has root {}, the sender's is {}",
            report.root.to_hex(),
            root.to_hex()
        );
        assert_histories_equal(&self.src, &self.dest)
    }
}

/// A started sender: its handle, its ticket, and the events after `listening` (collected by a
/// task so that the sender never waits on a full stream).
struct Sender {
    handle: Handle<SendSummary>,
    ticket: Ticket,
    events: JoinHandle<Vec<Event>>,
}

impl Sender {
    async fn start(b: SendBuilder) -> anyhow::Result<Sender> {
        let (handle, mut events) = b.start();
        let ticket = loop {
            match events.next().await {
                Some(Event::Listening { ticket, .. }) => break ticket,
                Some(_) => {}
                None => match handle.wait().await {
                    Err(e) => return Err(e).context("the sender ended before listening"),
                    Ok(_) => bail!("the sender ended before listening"),
                },
            }
        };
        Ok(Sender {
            handle,
            ticket,
            events: tokio::spawn(collect(events)),
        })
    }

    /// Its port on 127.0.0.1.
    fn port(&self) -> u16 {
        self.ticket.addrs[0].port()
    }

    /// Waits for the end: the summary and every event after `listening`.
    async fn finish(self) -> anyhow::Result<(SendSummary, Vec<Event>)> {
        let summary = self.handle.wait().await?;
        let events = self.events.await?;
        Ok((summary, events))
    }
}

/// Every remaining event of a migration (the stream ends with the migration).
async fn collect(mut events: Events) -> Vec<Event> {
    let mut all = Vec::new();
    while let Some(ev) = events.next().await {
        all.push(ev);
    }
    all
}

/// Reads a receiver's events until it ends, calling `on` for each; returns them all.
async fn follow(events: &mut Events, mut on: impl FnMut(&Event)) -> Vec<Event> {
    let mut all = Vec::new();
    while let Some(ev) = events.next().await {
        on(&ev);
        all.push(ev);
    }
    all
}

/// Follows `events` to the end; at the first progress event past `percent` runs `act` once.
/// Returns that event's `bytes_done` and every event.
async fn once_past(
    events: &mut Events,
    percent: u64,
    act: impl FnOnce(),
) -> (Option<u64>, Vec<Event>) {
    let mut act = Some(act);
    let mut at = None;
    let seen = follow(events, |ev| {
        if let (Event::Progress { bytes_done, .. }, true) = (ev, past(ev, percent)) {
            if let Some(act) = act.take() {
                at = Some(*bytes_done);
                act();
            }
        }
    })
    .await;
    (at, seen)
}

/// Whether `ev` is a progress event past `percent` of the history (and not its end).
fn past(ev: &Event, percent: u64) -> bool {
    matches!(ev, Event::Progress { bytes_done, bytes_total, .. }
        if *bytes_total > 0 && bytes_done * 100 >= bytes_total * percent && bytes_done < bytes_total)
}

fn resumed_bytes(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Resumed { bytes_have, .. } => Some(*bytes_have),
            _ => None,
        })
        .collect()
}

fn count(events: &[Event], which: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| which(e)).count()
}

/// The one `done` event of a receiver.
fn received_done(events: &[Event]) -> Option<&ReceiveSummary> {
    events.iter().find_map(|e| match e {
        Event::Received(s) => Some(s),
        _ => None,
    })
}

/// Runs `body` within [`LONG`].
async fn within<T>(
    body: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(LONG, body)
        .await
        .context("the test did not finish within two minutes")?
}

/// Cutting the link once mid-transfer: the receiver reconnects by the pinned key on its own,
/// keeps what it verified, and fetches only the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_mid_transfer_resumes() -> anyhow::Result<()> {
    within(async {
        let lab = Lab::new(8 * MIB, 11)?;
        let sender = Sender::start(lab.sender(0).limit_rate(SLOW)).await?;
        let (receiver, mut events) = lab.receiver().ticket(sender.ticket.clone()).start();
        let (cut_at, seen) = once_past(&mut events, 30, || receiver.cut_link()).await;
        let got = receiver.wait().await?;
        let (sent, sent_events) = sender.finish().await?;
        let cut_at = cut_at.context("no progress event past 30 %")?;

        eprintln!(
            "link cut at {cut_at} of {} bytes; resumed {:?}; received {} bytes in {} sessions",
            sent.bytes,
            resumed_bytes(&seen),
            got.wire_bytes,
            sent.sessions
        );
        ensure!(
            got.interruptions >= 1,
            "interruptions: {}",
            got.interruptions
        );
        ensure!(count(&seen, |e| matches!(e, Event::Interrupted { .. })) >= 1);
        ensure!(count(&seen, |e| matches!(e, Event::Reconnected { .. })) >= 1);
        ensure!(count(&sent_events, |e| matches!(e, Event::Interrupted { .. })) >= 1);
        // The second session found what the first verified.
        let resumed = resumed_bytes(&seen);
        ensure!(
            resumed.iter().any(|&b| b > 0),
            "no resumed event with bytes already here: {resumed:?} (cut at {cut_at})"
        );
        ensure!(got.resumed_bytes > 0);
        // Resuming fetched only the rest: the payload received stays near the history size
        // (one in-flight window may arrive twice).
        ensure!(
            got.wire_bytes <= sent.bytes + sent.bytes / 4,
            "{} bytes received for a {} byte history",
            got.wire_bytes,
            sent.bytes
        );
        ensure!(got.root == sent.root);
        ensure!(got.files == sent.files && got.bytes == sent.bytes);
        ensure!(sent.sessions >= 2, "sessions: {}", sent.sessions);
        ensure!(matches!(seen.last(), Some(Event::Received(_))));
        lab.check_dest(&sent.root)
    })
    .await
}

/// A receiver cancelled mid-transfer (its task dropped, nothing closed gracefully) and a new
/// one started on the same destination: it continues the migration, finding the bytes the
/// first one kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_restarted_continues() -> anyhow::Result<()> {
    within(async {
        let lab = Lab::new(8 * MIB, 12)?;
        let sender = Sender::start(lab.sender(0).limit_rate(SLOW)).await?;
        let (first, mut events) = lab.receiver().ticket(sender.ticket.clone()).start();
        let at = loop {
            match events.next().await {
                Some(ev) if past(&ev, 30) => break ev,
                Some(_) => {}
                None => bail!(
                    "the first receiver ended before 30 %: {:?}",
                    first.wait().await
                ),
            }
        };
        first.cancel();
        // The stream ends once the cancelled task is gone (and with it the store's lock).
        let rest = collect(events).await;
        ensure!(
            received_done(&rest).is_none(),
            "the cancelled receiver finished: {at:?}"
        );

        // The same command again: the ticket's code is used up, but the sender is pinned now.
        let (second, mut events) = lab.receiver().ticket(sender.ticket.clone()).start();
        let seen = follow(&mut events, |_| {}).await;
        let got = second.wait().await?;
        let (sent, _) = sender.finish().await?;

        eprintln!(
            "cancelled at {at:?}; the second run resumed {:?} and received {} of {} bytes",
            resumed_bytes(&seen),
            got.wire_bytes,
            sent.bytes
        );
        ensure!(count(&seen, |e| matches!(e, Event::Unfinished)) == 1);
        let paired_again = seen
            .iter()
            .any(|e| matches!(e, Event::Paired(p) if !p.newly_paired));
        ensure!(
            paired_again,
            "the second receiver did not reconnect by the pinned key"
        );
        let resumed = resumed_bytes(&seen);
        ensure!(
            resumed.first().is_some_and(|&b| b > 0 && b < sent.bytes),
            "the second run's resumed event: {resumed:?} of {}",
            sent.bytes
        );
        ensure!(got.resumed_bytes > 0);
        ensure!(
            got.wire_bytes < sent.bytes,
            "the second run received {} bytes of a {} byte history: nothing was resumed",
            got.wire_bytes,
            sent.bytes
        );
        ensure!(got.root == sent.root);
        lab.check_dest(&sent.root)
    })
    .await
}

/// A sender cancelled mid-transfer and started again on the same folder with the same state
/// folders, at the same address: the receiver, which never stopped, reconnects by the pinned
/// key (no code) and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_restarted_receiver_completes() -> anyhow::Result<()> {
    within(async {
        let lab = Lab::new(8 * MIB, 13)?;
        let first = Sender::start(lab.sender(0).limit_rate(SLOW)).await?;
        let port = first.port();
        let (receiver, mut events) = lab.receiver().ticket(first.ticket.clone()).start();
        let mut seen = Vec::new();
        loop {
            match events.next().await {
                Some(ev) if past(&ev, 30) => {
                    seen.push(ev);
                    break;
                }
                Some(ev) => seen.push(ev),
                None => bail!("the receiver ended before 30 %: {:?}", receiver.wait().await),
            }
        }
        first.handle.cancel();
        // The first sender's events end once its task (endpoint included) is gone.
        let _ = first.events.await?;

        // The same sender again, at the address the receiver knows. Its UDP socket closes
        // with the cancelled endpoint's last connection (after the connection's drain period
        // in QUIC), so binding may fail for a moment: try again for a while.
        let mut tries = 0;
        let second = loop {
            match Sender::start(lab.sender(port)).await {
                Ok(s) => break s,
                Err(e) if tries < 50 && is_bind_failure(&e) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e).context("the restarted sender did not start"),
            }
        };
        seen.extend(follow(&mut events, |_| {}).await);
        let got = receiver.wait().await?;
        let (sent, sent_events) = second.finish().await?;
        eprintln!(
            "sender restarted after {tries} failed bind(s); receiver: {} interruption(s), resumed {} and received {} of {} bytes",
            got.interruptions, got.resumed_bytes, got.wire_bytes, sent.bytes
        );

        ensure!(got.interruptions >= 1, "interruptions: {}", got.interruptions);
        ensure!(count(&seen, |e| matches!(e, Event::Interrupted { .. })) >= 1);
        ensure!(count(&seen, |e| matches!(e, Event::Reconnected { .. })) >= 1);
        // The restarted sender knows the receiver by its pinned key: no code.
        let pinned = sent_events
            .iter()
            .any(|e| matches!(e, Event::Paired(p) if !p.newly_paired));
        ensure!(pinned, "the restarted sender paired again instead of recognising the receiver");
        ensure!(got.resumed_bytes > 0);
        ensure!(
            got.wire_bytes <= sent.bytes + sent.bytes / 4,
            "{} bytes received for a {} byte history",
            got.wire_bytes,
            sent.bytes
        );
        ensure!(got.root == sent.root);
        lab.check_dest(&sent.root)
    })
    .await
}

/// Whether starting a sender failed because its address was still taken.
fn is_bind_failure(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<Error>().is_some_and(|e| {
            e.kind() == ErrorKind::Unreachable
                && matches!(e.cause(), Some(ferry_migrate::Cause::Bind(_)))
        })
    })
}

/// Files added to the source during the first round are sent in a catch-up round (the sender's
/// default round limit): the receiver ends with two verified rounds and the modified tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_round_brings_changes() -> anyhow::Result<()> {
    within(async {
        let lab = Lab::new(4 * MIB, 14)?;
        let sender = Sender::start(lab.sender(0).limit_rate(SLOW)).await?;
        let (receiver, mut events) = lab.receiver().ticket(sender.ticket.clone()).start();
        let added = new_files(&lab.src);
        let mut changed_during = None;
        let mut verified_before = 0;
        let seen = follow(&mut events, |ev| {
            if matches!(ev, Event::Verified { .. }) {
                verified_before += 1;
            }
            // While round 1 is still transferring (seconds to go at the capped rate): add
            // files, as the chat app would. New paths never cut the round short; the sender's
            // rescan after the receiver verified round 1 finds them.
            if changed_during.is_none() && past(ev, 10) {
                changed_during = Some(verified_before);
                for (path, bytes) in &added {
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir).expect("create a folder in the source");
                    }
                    std::fs::write(path, bytes).expect("add a file to the source");
                }
            }
        })
        .await;
        let got = receiver.wait().await?;
        let (sent, sent_events) = sender.finish().await?;

        eprintln!(
            "rounds {} / {}; catch-up payload {} of {} bytes",
            got.rounds, sent.rounds, got.catchup_wire_bytes, sent.bytes
        );
        ensure!(
            changed_during == Some(0),
            "the source was not changed during round 1: {changed_during:?}"
        );
        ensure!(got.rounds >= 2, "rounds at the receiver: {}", got.rounds);
        ensure!(sent.rounds >= 2, "rounds at the sender: {}", sent.rounds);
        ensure!(
            got.files_added == added.len() as u64,
            "files added: {}",
            got.files_added
        );
        ensure!(sent.files_added == added.len() as u64);
        let rounds = |evs: &[Event]| {
            count(
                evs,
                |e| matches!(e, Event::Round(r) if r.reason == ferry_migrate::RoundReason::Changed),
            )
        };
        ensure!(rounds(&seen) >= 1 && rounds(&sent_events) >= 1);
        ensure!(count(&seen, |e| matches!(e, Event::Verified { .. })) >= 2);
        // The catch-up round carried the new files, not the history again.
        let new_bytes: u64 = added.iter().map(|(_, b)| b.len() as u64).sum();
        ensure!(
            got.catchup_wire_bytes >= new_bytes && got.catchup_wire_bytes < sent.bytes / 2,
            "catch-up payload {} for {} new bytes",
            got.catchup_wire_bytes,
            new_bytes
        );
        ensure!(got.root == sent.root);
        ensure!(got.end == ferry_migrate::End::Complete);
        // The destination is the modified source.
        lab.check_dest(&sent.root)
    })
    .await
}

/// Files a chat app might add while the migration runs: a photo in a new folder and a note.
fn new_files(src: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    vec![
        (
            src.join("media")
                .join("zz")
                .join("added-during-migration.jpg"),
            ferry_testkit::rand_bytes(99, 300_000),
        ),
        (
            src.join("Documents").join("note added later.txt"),
            b"written while the first round was on its way\n".to_vec(),
        ),
    ]
}

/// `stop()` on a receiver mid-transfer ends it with `ErrorKind::Interrupted`; what it verified
/// stays in the store, and the next run resumes from it and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_receiver_keeps_what_it_verified() -> anyhow::Result<()> {
    within(async {
        let lab = Lab::new(8 * MIB, 15)?;
        let sender = Sender::start(lab.sender(0).limit_rate(SLOW)).await?;
        let (first, mut events) = lab.receiver().ticket(sender.ticket.clone()).start();
        let (stopped_at, seen) = once_past(&mut events, 30, || first.stop()).await;
        let stopped_at = stopped_at.context("no progress event past 30 %")?;
        let err = match first.wait().await {
            Ok(s) => bail!("a receiver stopped at {stopped_at} bytes finished: {s:?}"),
            Err(e) => e,
        };
        ensure!(
            err.kind() == ErrorKind::Interrupted,
            "stopped receiver: {:?} ({err})",
            err.kind()
        );
        ensure!(err.exit_code() == 5);
        ensure!(received_done(&seen).is_none());

        let (second, mut events) = lab.receiver().ticket(sender.ticket.clone()).start();
        let seen = follow(&mut events, |_| {}).await;
        let got = second.wait().await?;
        let (sent, _) = sender.finish().await?;
        let resumed = resumed_bytes(&seen);
        eprintln!("stopped at {stopped_at} verified bytes; the next run resumed {resumed:?}");
        // A graceful stop commits everything verified before it: at least what the last
        // progress event before the stop said.
        ensure!(
            resumed.first().is_some_and(|&b| b >= stopped_at),
            "resumed {resumed:?}, but {stopped_at} bytes were verified before the stop"
        );
        ensure!(got.resumed_bytes >= stopped_at);
        ensure!(got.root == sent.root);
        lab.check_dest(&sent.root)
    })
    .await
}

/// A wrong pairing code is a pairing error (exit 3), and the destination is left untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_code_is_a_pairing_error() -> anyhow::Result<()> {
    within(async {
        let lab = Lab::new(2 * MIB, 16)?;
        let sender = Sender::start(lab.sender(0)).await?;
        let right = sender.ticket.code.as_u32();
        let wrong = ferry_transport::PairingCode::from_u32((right + 1) % 100_000_000)
            .context("an eight-digit code")?;
        let (receiver, events) = lab
            .receiver()
            .connect(sender.ticket.addrs.clone())
            .code(wrong)
            .start();
        let seen = collect(events).await;
        let err = match receiver.wait().await {
            Ok(s) => bail!("paired with a wrong code: {s:?}"),
            Err(e) => e,
        };
        ensure!(err.kind() == ErrorKind::Pairing, "{:?}: {err}", err.kind());
        ensure!(err.exit_code() == 3);
        ensure!(count(&seen, |e| matches!(e, Event::Paired(_))) == 0);
        let written: Vec<_> = std::fs::read_dir(&lab.dest)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name())
                    .filter(|n| n != ferry_sync::path::STATE_DIR)
                    .collect()
            })
            .unwrap_or_default();
        ensure!(
            written.is_empty(),
            "files written after a failed pairing: {written:?}"
        );
        // The sender goes on with a new code.
        sender.handle.cancel();
        Ok(())
    })
    .await
}
