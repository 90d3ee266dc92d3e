//! In-memory protocol throughput: the real sender and receiver machines, driven by
//! `ferry_sync::driver`, over `tokio::io::duplex` pipes instead of QUIC, with a real `Source`
//! and `FsStore` (so chunk reads, compression, verification, staging writes, group-commit
//! fsyncs and finalize all count; QUIC and its crypto do not).
//!
//! ```text
//! cargo run --release --example proto_bench -- <SRC> <DEST> [--lanes 4] [--no-compress]
//! ```
//! DEST must not exist or be empty. Prints one JSON object: bytes, wire bytes, scan seconds,
//! transfer seconds and MB/s (10^6 bytes per second of history), the process CPU time of the
//! transfer (user + system, from /proc/self/stat), and when (seconds into the transfer) the want
//! list went out and the last chunk became durable; what follows that is finalize.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};
use ferry_sync::compress::CompressPolicy;
use ferry_sync::driver::{run_receiver, run_sender, Copying};
use ferry_sync::proto::{Receiver, ReceiverConfig, RecvEvent, Sender, SenderConfig};
use ferry_sync::scan::{scan, ScanConfig};
use ferry_sync::source::Source;
use ferry_sync::store::FsStore;
use tokio::sync::mpsc;

use ferry_testkit::proc::cpu_secs;

struct Args {
    src: PathBuf,
    dest: PathBuf,
    lanes: usize,
    compress: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let usage = "usage: proto_bench <SRC> <DEST> [--lanes N] [--no-compress]";
    let mut it = std::env::args().skip(1);
    let mut pos = Vec::new();
    let mut lanes = 4;
    let mut compress = true;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--lanes" => lanes = it.next().context(usage)?.parse().context("bad --lanes")?,
            "--no-compress" => compress = false,
            other if other.starts_with('-') => bail!("unknown option {other}\n{usage}"),
            other => pos.push(PathBuf::from(other)),
        }
    }
    let [src, dest] = <[PathBuf; 2]>::try_from(pos).map_err(|_| anyhow::anyhow!(usage))?;
    Ok(Args {
        src,
        dest,
        lanes: lanes.max(1),
        compress,
    })
}

async fn run() -> anyhow::Result<()> {
    let a = parse_args()?;
    let t0 = Instant::now();
    let manifest = Arc::new(scan(&a.src, None, &ScanConfig::default())?.manifest);
    let scan_secs = t0.elapsed().as_secs_f64();
    let policy = CompressPolicy {
        enabled: a.compress,
        ..CompressPolicy::default()
    };
    let source = Arc::new(Source::new(&a.src, Arc::clone(&manifest), policy));
    let store = Arc::new(FsStore::open(&a.dest)?);

    let cpu0 = cpu_secs();
    let t1 = Instant::now();
    let (c_s, c_r) = tokio::io::duplex(1 << 20);
    let (s_read, s_write) = tokio::io::split(c_s);
    let (r_read, r_write) = tokio::io::split(c_r);
    let (tx, rx) = mpsc::channel(a.lanes);
    let mut writers = Vec::new();
    for _ in 0..a.lanes {
        let (w, r) = tokio::io::duplex(1 << 20);
        writers.push(Copying(w));
        tx.send(r).await.context("lane")?;
    }
    drop(tx);
    let sender = Sender::new(Arc::clone(&manifest), SenderConfig::default());
    let send = tokio::spawn(async move {
        let (r, stats) = run_sender(sender, source, s_read, s_write, writers, |_| {}).await;
        (r, stats)
    });
    // Phase marks (seconds since the transfer started): want list sent, last chunk durable.
    let (mut wanted_at, mut durable_at) = (f64::NAN, f64::NAN);
    let received = run_receiver(
        Receiver::new(ReceiverConfig::default()),
        store,
        r_read,
        r_write,
        rx,
        |ev| match ev {
            RecvEvent::Wanted { .. } => wanted_at = t1.elapsed().as_secs_f64(),
            RecvEvent::Progress {
                bytes_done,
                bytes_total,
                ..
            } if bytes_done == bytes_total => durable_at = t1.elapsed().as_secs_f64(),
            _ => {}
        },
    )
    .await;
    let (sent, stats) = send.await.context("sender task")?;
    let secs = t1.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    sent.context("sender")?;
    let summary = *received
        .context("receiver")?
        .summary()
        .context("the receiver did not complete the round")?;
    println!(
        "{{\"bench\":\"proto\",\"lanes\":{},\"compress\":{},\"files\":{},\"bytes\":{},\"wire_bytes\":{},\"scan_s\":{scan_secs:.3},\"secs\":{secs:.3},\"mb_s\":{:.1},\"cpu_s\":{cpu:.2},\"wanted_s\":{wanted_at:.3},\"durable_s\":{durable_at:.3}}}",
        a.lanes,
        a.compress,
        summary.files,
        summary.bytes,
        stats.wire_bytes,
        summary.bytes as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proto_bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
