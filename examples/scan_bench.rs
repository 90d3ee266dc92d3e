//! Scan-and-hash throughput of `ferry_sync::scan::scan` (no hash cache), for comparison with
//! `b3sum` over the same files.
//!
//! ```text
//! cargo run --release --example scan_bench -- <DIR> [--threads N]
//! ```
//! Prints one JSON object: bytes hashed, files, seconds, MB/s (10^6 bytes per second) and the
//! process CPU time (user + system) read from /proc/self/stat.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use ferry_sync::scan::{scan, ScanConfig};

use ferry_testkit::proc::cpu_secs;

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut cfg = ScanConfig::default();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => {
                cfg.threads = args
                    .next()
                    .context("--threads needs a value")?
                    .parse()
                    .context("bad --threads")?
            }
            other => dir = Some(PathBuf::from(other)),
        }
    }
    let dir = dir.context("usage: scan_bench <DIR> [--threads N]")?;
    let cpu0 = cpu_secs();
    let t0 = Instant::now();
    let out = scan(&dir, None, &cfg)?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    let s = out.manifest.summary();
    println!(
        "{{\"bench\":\"scan\",\"files\":{},\"bytes\":{},\"secs\":{secs:.3},\"mb_s\":{:.1},\"cpu_s\":{cpu:.2}}}",
        s.files,
        out.hashed_bytes,
        out.hashed_bytes as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scan_bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
