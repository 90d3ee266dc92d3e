//! The new device, with the library API: pair by ticket, receive into a folder, reconnect by
//! pinned key after a lost link. `cargo run --example new_device -- <DEST> <TICKET>`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_migrate::session;
use ferry_sync::proto::RecvEvent;
use ferry_sync::store::{verify_dest, FsStore};
use ferry_transport::{Endpoint, EndpointConfig, Identity, PeerStore, Ticket};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dest = args.next().context("usage: new_device <DEST> <TICKET>")?;
    let ticket: Ticket = args
        .next()
        .context("usage: new_device <DEST> <TICKET>")?
        .parse()?;

    // The store: staging + journal inside DEST/.ferry; reopening it resumes.
    let store = Arc::new(FsStore::open(dest.as_ref())?);
    let cfg = EndpointConfig {
        bind: "127.0.0.1:0".parse()?,
        ..EndpointConfig::default()
    };
    let ep = Endpoint::bind(
        Identity::generate("new device")?,
        PeerStore::in_memory(),
        cfg,
    )?;
    // Pairing: the ticket pins the sender's key and carries the one-time code.
    let mut conn = ep.connect_ticket(&ticket).await?;
    loop {
        let result = session::receive(&conn, Arc::clone(&store), |ev| {
            if let RecvEvent::Progress {
                bytes_done,
                bytes_total,
                ..
            } = ev
            {
                eprint!("\r{bytes_done} / {bytes_total} bytes");
            }
        })
        .await;
        match result {
            // The sender announced another round (its folder changed): same connection.
            Ok(end) if end.more_rounds() => {}
            Ok(end) => {
                let Some(summary) = end.summary() else {
                    bail!("the round ended without a verified tree");
                };
                eprintln!();
                let report = verify_dest(dest.as_ref())?;
                println!(
                    "done: {} files, root {}, mismatches {}",
                    summary.files,
                    summary.root,
                    report.mismatched.len()
                );
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                return Ok(());
            }
            // A lost link: reconnect by the pinned key alone, no code.
            Err(e) if e.is_retryable() => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                conn = ep.connect_peer(ticket.device_id, &ticket.addrs).await?;
            }
            Err(e) => bail!("migration failed: {e}"),
        }
    }
}
