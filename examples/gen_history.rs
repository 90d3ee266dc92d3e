//! Generate a realistic chat history and print what was made.
//!
//! ```text
//! cargo run --release --example gen_history -- <DIR> [--size 2GiB] [--seed N] [--small-files N]
//!     [--duplicates 0.1] [--checkpoint] [--max-db 256MiB]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _};
use ferry_testkit::{generate, HistorySpec};

const USAGE: &str = "usage: gen_history <DIR> [--size 2GiB] [--seed N] [--small-files N] \
                     [--duplicates FRACTION] [--checkpoint] [--max-db 256MiB]";

/// "1048576", "64MiB", "2GiB", "500MB", "1G" (K/M/G alone mean KiB/MiB/GiB).
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => bail!("bad size unit in {s:?}"),
    };
    n.checked_mul(mult).context("size overflows")
}

fn parse_args() -> anyhow::Result<(PathBuf, HistorySpec)> {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut spec = HistorySpec::default();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--size" => spec.total_bytes = parse_size(&value()?)?,
            "--seed" => spec.seed = value()?.parse().context("bad --seed")?,
            "--small-files" => spec.small_files = value()?.parse().context("bad --small-files")?,
            "--duplicates" => {
                spec.duplicate_fraction = value()?.parse().context("bad --duplicates")?
            }
            "--checkpoint" => spec.checkpoint_wal = true,
            "--max-db" => spec.max_db_bytes = parse_size(&value()?)?,
            "-h" | "--help" => bail!("{USAGE}"),
            other if other.starts_with('-') => bail!("unknown option {other}\n{USAGE}"),
            other if dir.is_none() => dir = Some(PathBuf::from(other)),
            other => bail!("unexpected argument {other}\n{USAGE}"),
        }
    }
    Ok((dir.context(USAGE)?, spec))
}

fn run() -> anyhow::Result<()> {
    let (dir, spec) = parse_args()?;
    let start = Instant::now();
    let report = generate(&dir, &spec)?;
    let secs = start.elapsed().as_secs_f64();
    println!("generated {} in {secs:.2} s", dir.display());
    println!("  spec:       {spec:?}");
    println!(
        "  files:      {} ({} media, {} duplicates)",
        report.files, report.media_files, report.duplicate_files
    );
    println!("  dirs:       {}", report.dirs);
    println!(
        "  bytes:      {} ({:.1} MiB, {:.0} MB/s)",
        report.bytes,
        report.bytes as f64 / (1 << 20) as f64,
        report.bytes as f64 / 1e6 / secs.max(1e-9)
    );
    println!("  messages:   {}", report.messages);
    println!("  wal bytes:  {}", report.wal_bytes);
    for db in &report.databases {
        println!("  database:   {}", db.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen_history: {e:#}");
            ExitCode::FAILURE
        }
    }
}
