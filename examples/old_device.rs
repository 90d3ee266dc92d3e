//! The old device, with the library API: scan a folder, show a pairing code and ticket, serve
//! one migration. `cargo run --example old_device -- <DIR>`; then run `new_device` with the ticket.

use std::sync::Arc;

use anyhow::{bail, Context};
use ferry_migrate::session;
use ferry_sync::compress::CompressPolicy;
use ferry_sync::scan::{scan, ScanConfig};
use ferry_sync::source::Source;
use ferry_transport::{Endpoint, EndpointConfig, Identity, PeerStore};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).context("usage: old_device <DIR>")?;
    // 1. Describe the history: entries plus BLAKE3 chunk hashes (a HashCache makes restarts fast).
    let manifest = Arc::new(scan(dir.as_ref(), None, &ScanConfig::default())?.manifest);
    println!(
        "{} files, {} bytes",
        manifest.summary().files,
        manifest.summary().bytes
    );
    let source = Arc::new(Source::new(
        dir.as_ref(),
        Arc::clone(&manifest),
        CompressPolicy::default(),
    ));

    // 2. An endpoint with a throwaway identity, listening on loopback, with a one-time code.
    let cfg = EndpointConfig {
        bind: "127.0.0.1:0".parse()?,
        ..EndpointConfig::default()
    };
    let ep = Endpoint::bind(
        Identity::generate("old device")?,
        PeerStore::in_memory(),
        cfg,
    )?;
    let code = ep.issue_pairing_code()?;
    println!("ticket: {}", ep.ticket(code)?);

    // 3. Serve sessions until one completes: a receiver that lost its link comes back by key.
    loop {
        let conn = ep.accept().await?;
        println!("serving {}", conn.peer().name);
        let (result, stats) =
            session::serve(&conn, Arc::clone(&manifest), Arc::clone(&source), |_| {}).await;
        match result {
            Ok(()) => {
                println!("done: {} bytes on the wire", stats.wire_bytes);
                conn.close(ferry_transport::close::COMPLETE, b"done");
                ep.close(ferry_transport::close::DONE, b"done").await;
                return Ok(());
            }
            Err(e) if e.is_retryable() => println!("interrupted ({e}); waiting for the receiver"),
            Err(e) => bail!("migration failed: {e}"),
        }
    }
}
