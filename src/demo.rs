//! `ferry demo`: generate a realistic history, migrate it between two local endpoints through
//! real QUIC and the real pairing-code path, cut the link once midway, resume, verify.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_sync::store::verify_dest;
use ferry_testkit::{assert_histories_equal, generate, HistorySpec};
use ferry_transport::FerryDirs;
use serde_json::json;

use crate::cli::DemoFlags;
use crate::exit::{Exit, Failure};
use crate::output::{human_bytes, parse_size, Reporter};
use crate::receive::{self, ReceiveSettings};
use crate::send::{self, SendSettings};

pub async fn run(f: DemoFlags) -> Result<(), Failure> {
    let size = parse_size(&f.size).map_err(|e| Failure::new(Exit::Usage, e))?;
    let tmp;
    let work: PathBuf = match &f.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("ferry-demo-")
                .tempdir()
                .map_err(|e| {
                    Failure::new(
                        Exit::Destination,
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
        return Err(Failure::new(
            Exit::Usage,
            format!(
                "{} already holds a demo; pass an empty --dir",
                work.display()
            ),
        ));
    }
    say(&format!("ferry demo: generating a {} chat history (SQLite messages in Chinese and English, photos, voice notes, videos, thumbnails)…", human_bytes(size)));
    let t0 = Instant::now();
    let spec = HistorySpec {
        seed: f.seed,
        ..HistorySpec::with_size(size)
    };
    let src2 = src.clone();
    let report = tokio::task::spawn_blocking(move || generate(&src2, &spec))
        .await
        .map_err(|e| Failure::new(Exit::Internal, e.to_string()))?
        .map_err(|e| {
            Failure::new(
                Exit::Internal,
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

    // Two devices on one machine: separate state folders.
    let old_dirs = FerryDirs::under(work.join("old-phone").join("ferry-home"));
    let new_dirs = FerryDirs::under(work.join("new-phone").join("ferry-home"));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let send_settings = SendSettings {
        dir: src.clone(),
        code: None,
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        mdns: false,
        name: Some("old phone".into()),
        dirs: old_dirs,
        congestion: ferry_transport::Congestion::default(),
        limit_rate: None,
        // The two "phones" stand in for devices on a network: compress as ferry would there
        // (auto would not, both ends being on this machine).
        compress: send::Compress::Always,
        rounds: send::RoundSettings::default(),
        to: None,
        pairing_ttl: ferry_transport::DEFAULT_PAIRING_TTL,
    };
    let sender = tokio::spawn(async move {
        let rep = Reporter::demo_side("old phone", true);
        send::run(send_settings, &rep, Some(tx)).await
    });
    let ticket = rx
        .await
        .map_err(|_| Failure::new(Exit::Internal, "the sender did not start"))?;
    say(&format!(
        "old phone: listening on {:?}, pairing code {}",
        ticket.addrs, ticket.code
    ));
    say(&format!("new phone: typing code {} …", ticket.code));
    let started = Instant::now();
    let settings = ReceiveSettings {
        dest: dest.clone(),
        code: Some(ticket.code),
        connect: Some(ticket.addrs.clone()),
        ticket: None,
        yes: false,
        give_up: Duration::from_secs(60),
        name: Some("new phone".into()),
        dirs: new_dirs,
        interrupt_at: (!f.no_interrupt).then_some(0.5),
        pairing_ttl: ferry_transport::DEFAULT_PAIRING_TTL,
    };
    let rrep = Reporter::demo_side("new phone", false);
    let received = receive::run(settings, &rrep).await?;
    let elapsed = started.elapsed();
    let sent = sender
        .await
        .map_err(|e| Failure::new(Exit::Internal, e.to_string()))??;

    say("verifying: re-hashing every file against the receipt and comparing with the original…");
    let dest2 = dest.clone();
    let verify = tokio::task::spawn_blocking(move || verify_dest(&dest2))
        .await
        .map_err(|e| Failure::new(Exit::Internal, e.to_string()))??;
    if !verify.mismatched.is_empty() {
        return Err(Failure::new(
            Exit::Integrity,
            format!(
                "verification failed for {} paths: {:?}",
                verify.mismatched.len(),
                &verify.mismatched[..verify.mismatched.len().min(10)]
            ),
        ));
    }
    assert_histories_equal(&src, &dest).map_err(|e| {
        Failure::new(
            Exit::Integrity,
            format!("the copy differs from the original: {e:#}"),
        )
    })?;
    let rate = received.bytes as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6;
    main.event(
        "demo",
        json!({"files": received.files, "bytes": received.bytes, "wire_bytes": sent.wire_bytes, "elapsed_s": elapsed.as_secs_f64(), "rate_mb_s": rate, "interruptions": received.interruptions, "root": received.root, "verified": true}),
    );
    say(&format!(
        "\nferry demo: {} files ({}) moved from \"old phone\" to \"new phone\" over QUIC on loopback",
        received.files,
        human_bytes(received.bytes)
    ));
    say(&format!(
        "  paired with {} by a one-time code; scanned in {:.2} s; link cut {} time(s), {} session(s), resumed with {} already verified",
        received.sender,
        sent.scan_secs,
        received.interruptions,
        sent.sessions,
        human_bytes(received.resumed_bytes)
    ));
    say(&format!(
        "  {:.2} s, {:.0} MB/s; {} sent (zstd on text, dedup of forwarded media; counts what was queued when the link was cut)",
        elapsed.as_secs_f64(),
        rate,
        human_bytes(sent.wire_bytes)
    ));
    say(&format!(
        "  verified: every file matches root {} and the original byte for byte",
        &received.root[..16]
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
