//! `ferry demo`: generate a realistic history, migrate it between two local endpoints through
//! real QUIC and the real pairing-code path, cut the link once midway, resume, verify.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_sync::store::verify_dest;
use ferry_testkit::{assert_histories_equal, generate, HistorySpec};
use ferry_transport::FerryDirs;
use serde_json::json;

use ferry_migrate::{Compress, Error, ErrorKind, Event, Migration, ReceiveSummary, SendSummary};

use crate::cli::DemoFlags;
use crate::output::{human_bytes, parse_size, Reporter};
use crate::render::Side;

pub async fn run(f: DemoFlags) -> Result<(), Error> {
    let size = parse_size(&f.size).map_err(|e| Error::new(ErrorKind::Usage, e))?;
    let tmp;
    let work: PathBuf = match &f.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("ferry-demo-")
                .tempdir()
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Destination,
                        format!("cannot create a temporary folder: {e}"),
                    )
                })?;
            tmp.path().to_path_buf()
        }
    };
    let main = Reporter::new(f.json);
    let say = |s: &str| {
        if !f.json {
            eprintln!("{s}");
        }
    };
    let src = work.join("old-phone").join("chat-history");
    let dest = work.join("new-phone").join("chat-history");
    if src.exists() || dest.exists() {
        return Err(Error::new(
            ErrorKind::Usage,
            format!(
                "{} already holds a demo; pass an empty --dir",
                work.display()
            ),
        ));
    }
    let (generated, wal) = generate_history(&src, size, f.seed, &say).await?;

    let started = Instant::now();
    let (sent, received) = migrate(&work, &src, &dest, f.no_interrupt, &say).await?;
    let elapsed = started.elapsed();

    say("verifying: re-hashing every file against the receipt and comparing with the original…");
    let dest2 = dest.clone();
    let verify = tokio::task::spawn_blocking(move || verify_dest(&dest2))
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))??;
    if !verify.mismatched.is_empty() {
        return Err(Error::new(
            ErrorKind::Integrity,
            format!(
                "verification failed for {} paths: {:?}",
                verify.mismatched.len(),
                &verify.mismatched[..verify.mismatched.len().min(10)]
            ),
        ));
    }
    assert_histories_equal(&src, &dest).map_err(|e| {
        Error::new(
            ErrorKind::Integrity,
            format!("the copy differs from the original: {e:#}"),
        )
    })?;
    let rate = received.bytes as f64 / elapsed.as_secs_f64().max(1e-9);
    main.event(
        "demo",
        json!({"files": received.files, "bytes": received.bytes, "wire_bytes": sent.wire_bytes, "elapsed_s": elapsed.as_secs_f64(), "rate_mb_s": rate / 1e6, "interruptions": received.interruptions, "root": received.root.to_hex(), "verified": true}),
    );
    say(&format!(
        "\nferry demo: {} files ({}) moved from \"old phone\" to \"new phone\" over QUIC on loopback",
        received.files,
        human_bytes(received.bytes)
    ));
    if generated > received.files {
        let other = (generated - received.files).saturating_sub(wal);
        say(&format!(
            "  ({generated} files were generated: {wal} databases' -wal files travel inside their consistent snapshots{})",
            if other > 0 { format!("; {other} skipped, as listed above") } else { String::new() }
        ));
    }
    let cut = if f.no_interrupt {
        String::new()
    } else {
        format!(
            "; link cut {} time(s) and resumed with {} already verified",
            received.interruptions,
            human_bytes(received.resumed_bytes)
        )
    };
    say(&format!(
        "  paired with {} by a one-time code; scanned in {:.2} s{cut}; {:.2} s, {}/s",
        received.sender,
        sent.scan_s,
        elapsed.as_secs_f64(),
        human_bytes(rate as u64)
    ));
    say(&format!("  {}", sent.bytes_told_apart()));
    say(&format!(
        "  verified: every file matches root {} and the original byte for byte",
        &received.root.to_hex()[..16]
    ));
    if f.dir.is_some() {
        say(&format!(
            "  kept in {} (try: ferry verify {})",
            work.display(),
            dest.display()
        ));
    }
    Ok(())
}

/// Generates the sample history into `src`.
async fn generate_history(
    src: &Path,
    size: u64,
    seed: u64,
    say: &impl Fn(&str),
) -> Result<(u64, u64), Error> {
    say(&format!("ferry demo: generating a {} chat history (SQLite messages in Chinese and English, photos, voice notes, videos, thumbnails)…", human_bytes(size)));
    let t0 = Instant::now();
    let spec = HistorySpec {
        seed,
        ..HistorySpec::with_size(size)
    };
    let src2 = src.to_path_buf();
    let report = tokio::task::spawn_blocking(move || generate(&src2, &spec))
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?
        .map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("generating the sample history failed: {e:#}"),
            )
        })?;
    say(&format!(
        "  {} files, {} ({} messages in {} databases, {} forwarded duplicates) in {:.1} s at {}",
        report.files,
        human_bytes(report.bytes),
        report.messages,
        report.databases.len(),
        report.duplicate_files,
        t0.elapsed().as_secs_f64(),
        src.display()
    ));
    let wal = report
        .databases
        .iter()
        .filter(|d| d.with_extension("db-wal").exists());
    Ok((report.files, wal.count() as u64))
}

/// Migrates `src` to `dest` between two devices with their state under `work`; cuts the link
/// once halfway unless `no_interrupt`.
async fn migrate(
    work: &Path,
    src: &Path,
    dest: &Path,
    no_interrupt: bool,
    say: &impl Fn(&str),
) -> Result<(SendSummary, ReceiveSummary), Error> {
    // Two devices on one machine: separate state folders.
    let old_dirs = FerryDirs::under(work.join("old-phone").join("ferry-home"));
    let new_dirs = FerryDirs::under(work.join("new-phone").join("ferry-home"));
    let (sender, mut sent_events) = Migration::send(src)
        .dirs(old_dirs)
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .mdns(false)
        .name("old phone")
        // The two "phones" stand in for devices on a network: compress as ferry would there
        // (auto would not, both ends being on this machine).
        .compress(Compress::Always)
        .start();
    let ticket = loop {
        match sent_events.next().await {
            Some(Event::Listening { ticket, .. }) => break ticket,
            Some(_) => {}
            None => {
                sender.wait().await?;
                return Err(Error::new(ErrorKind::Internal, "the sender did not start"));
            }
        }
    };
    let addrs: Vec<String> = ticket.addrs.iter().map(|a| a.to_string()).collect();
    say(&format!(
        "old phone: listening on {}, pairing code {}",
        addrs.join(", "),
        ticket.code
    ));
    say(&format!("new phone: typing code {} …", ticket.code));
    let src2 = src.to_path_buf();
    let sending = tokio::spawn(async move {
        let rep = Reporter::demo_side("old phone", true);
        crate::drive(sender, sent_events, &rep, Side::Send, &src2, |_, _| {}).await
    });
    let (receiver, events) = Migration::receive(dest)
        .dirs(new_dirs)
        .code(ticket.code)
        .connect(ticket.addrs.clone())
        .give_up_after(Duration::from_secs(60))
        .name("new phone")
        .start();
    let rrep = Reporter::demo_side("new phone", false);
    let mut cut = no_interrupt;
    let received = crate::drive(receiver, events, &rrep, Side::Receive, dest, |ev, h| {
        // Cut the link once, halfway, to show resume.
        if let Event::Progress {
            bytes_done,
            bytes_total,
            ..
        } = ev
        {
            if !cut && *bytes_total > 0 && bytes_done * 2 >= *bytes_total {
                cut = true;
                rrep.say("demo: cutting the link now to show resume");
                h.cut_link();
            }
        }
    })
    .await?;
    rrep.finish_progress();
    let sent = sending
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))??;
    Ok((sent, received))
}
