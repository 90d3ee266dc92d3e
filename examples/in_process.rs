//! Both devices in one process through the library API, over loopback: generate a chat
//! history, migrate it, cut the link once halfway (the receiver resumes on its own), and check
//! the result.
//!
//! ```text
//! cargo run --release --example in_process [-- SIZE_MIB]
//! ```
//!
//! Everything happens in a temporary folder (removed at the end): the history (~32 MiB by
//! default), the destination, and separate state folders for the two devices. stdout gets
//! every event of both devices as one JSON line, the event's own object with a `device` field
//! first (`{"device":"old","event":"listening",…}`), ending with the `done` events; notes for
//! people go to stderr. The exit status is 0 only when the destination re-hashes to the
//! sender's root (`verify_dest`), both devices report that root, and the copy equals the
//! original.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use ferry_migrate::{Event, Events, Migration};
use ferry_sync::store::verify_dest;
use ferry_testkit::{assert_histories_equal, generate, HistorySpec};
use ferry_transport::FerryDirs;

const MIB: u64 = 1 << 20;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("in_process: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let size = match std::env::args().nth(1) {
        Some(s) => s
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=64 * 1024).contains(n))
            .context("usage: in_process [SIZE_MIB] (1 to 65536)")?,
        None => 32,
    } * MIB;
    let tmp = tempfile::Builder::new()
        .prefix("ferry-in-process-")
        .tempdir()?;
    let src = tmp.path().join("old-device").join("history");
    let dest = tmp.path().join("new-device").join("history");
    let old_dirs = FerryDirs::under(tmp.path().join("old-device").join("ferry"));
    let new_dirs = FerryDirs::under(tmp.path().join("new-device").join("ferry"));

    let t0 = Instant::now();
    let src2 = src.clone();
    let made = tokio::task::spawn_blocking(move || generate(&src2, &HistorySpec::with_size(size)))
        .await??;
    eprintln!(
        "generated {} files, {} bytes in {:.1} s under {}",
        made.files,
        made.bytes,
        t0.elapsed().as_secs_f64(),
        tmp.path().display()
    );

    // The old device: loopback only, no mDNS. Its rate is capped so that the transfer takes
    // about two seconds and the cut below lands mid-transfer on any machine.
    let (sender, mut sent_events) = Migration::send(&src)
        .dirs(old_dirs)
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .mdns(false)
        .name("old device")
        .limit_rate((made.bytes / 2).max(MIB))
        .start();
    let ticket = loop {
        match sent_events.next().await {
            Some(ev) => {
                print_event("old", &ev)?;
                if let Event::Listening { ticket, .. } = ev {
                    break ticket;
                }
            }
            None => bail!(
                "the sender ended before listening: {:?}",
                sender.wait().await
            ),
        }
    };
    let old_side = tokio::spawn(print_all("old", sent_events));

    // The new device: the ticket carries the sender's address, key and one-time code.
    let (receiver, mut events) = Migration::receive(&dest)
        .dirs(new_dirs)
        .ticket(ticket)
        .name("new device")
        .give_up_after(Duration::from_secs(60))
        .start();
    let mut cut = false;
    while let Some(ev) = events.next().await {
        print_event("new", &ev)?;
        if let Event::Progress {
            bytes_done,
            bytes_total,
            ..
        } = ev
        {
            if !cut && bytes_done * 2 >= bytes_total && bytes_done < bytes_total {
                // As if the Wi-Fi dropped: the receiver reconnects by the sender's pinned key
                // and continues from what it verified.
                eprintln!("cutting the link at {bytes_done} of {bytes_total} bytes");
                receiver.cut_link();
                cut = true;
            }
        }
    }
    let received = receiver.wait().await?;
    old_side.await??;
    let sent = sender.wait().await?;

    ensure!(
        cut && received.interruptions >= 1,
        "the link was not cut mid-transfer (cut: {cut}, interruptions: {})",
        received.interruptions
    );
    ensure!(
        received.root == sent.root,
        "the receiver verified root {}, the sender sent {}",
        received.root.to_hex(),
        sent.root.to_hex()
    );
    let dest2 = dest.clone();
    let report = tokio::task::spawn_blocking(move || verify_dest(&dest2)).await??;
    ensure!(
        report.mismatched.is_empty(),
        "{} path(s) do not match the receipt: {:?}",
        report.mismatched.len(),
        &report.mismatched[..report.mismatched.len().min(10)]
    );
    ensure!(
        report.root == sent.root,
        "the destination re-hashes to {}, the sender's root is {}",
        report.root.to_hex(),
        sent.root.to_hex()
    );
    assert_histories_equal(&src, &dest).context("the copy differs from the original")?;
    eprintln!(
        "verified: {} files, {} bytes, root {}; {} interruption(s), resumed with {} bytes already here, {} bytes received",
        report.files,
        report.bytes,
        report.root.to_hex(),
        received.interruptions,
        received.resumed_bytes,
        received.wire_bytes
    );
    Ok(())
}

/// Prints the rest of a device's events.
async fn print_all(device: &'static str, mut events: Events) -> anyhow::Result<()> {
    while let Some(ev) = events.next().await {
        print_event(device, &ev)?;
    }
    Ok(())
}

/// One event as one JSON line: the event's object with `"device"` added in front.
fn print_event(device: &str, ev: &Event) -> anyhow::Result<()> {
    let json = ferry_migrate::text::json_line(ev)?;
    let fields = json
        .strip_prefix('{')
        .context("an event that is not a JSON object")?;
    let line = format!("{{\"device\":\"{device}\",{fields}");
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    Ok(())
}
