//! The new device, with the library API: pair with the ticket shown by `old_device`, receive
//! into a folder, and print every event to stdout as one JSON line.
//!
//! ```text
//! cargo run --example new_device -- <DEST> <TICKET> [--home STATE_DIR] [--cut-at PERCENT]
//! ```
//!
//! Resuming is the library's job, and this example shows both kinds:
//! - a lost link: the receiver reconnects to the sender by its pinned key and continues
//!   (`interrupted`, `reconnected`, then `resumed` with the bytes already here). `--cut-at 50`
//!   cuts the link once when half the history is verified, to see it happen;
//! - a stopped run (Ctrl-C, or the process killed): run the same command again. The
//!   destination says it holds an unfinished migration (`unfinished`), the sender is reached by
//!   its pinned key (the ticket's code was used up by the first run), and `resumed` counts what
//!   the first run kept. Use the same `--home` again: it holds this device's identity, which the
//!   sender now knows (default: `FERRY_HOME` or the XDG folders, as the CLI).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use ferry_migrate::{Event, Migration};
use ferry_transport::{FerryDirs, Ticket};

const USAGE: &str = "usage: new_device <DEST> <TICKET> [--home STATE_DIR] [--cut-at PERCENT]";

struct Args {
    dest: PathBuf,
    ticket: Ticket,
    home: Option<PathBuf>,
    cut_at: Option<u64>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let (mut home, mut cut_at) = (None, None);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "--home" => home = Some(PathBuf::from(value()?)),
            "--cut-at" => {
                let p: u64 = value()?.parse().context("--cut-at: a percentage")?;
                if !(1..100).contains(&p) {
                    bail!("--cut-at: a percentage between 1 and 99");
                }
                cut_at = Some(p);
            }
            "-h" | "--help" => bail!("{USAGE}"),
            s if s.starts_with('-') => bail!("unknown option {s}; {USAGE}"),
            _ => positional.push(arg),
        }
    }
    let [dest, ticket] = <[String; 2]>::try_from(positional).map_err(|_| anyhow::anyhow!(USAGE))?;
    Ok(Args {
        dest: dest.into(),
        ticket: ticket
            .parse()
            .context("the ticket is not valid; copy it whole from old_device")?,
        home,
        cut_at,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    let mut receive = Migration::receive(&args.dest)
        .ticket(args.ticket)
        .name("new device");
    if let Some(home) = &args.home {
        receive = receive.dirs(FerryDirs::under(home));
    }
    let (handle, mut events) = receive.start();
    let mut cut = args.cut_at;
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(ev) => {
                    match ferry_migrate::text::json_line(&ev) {
                        Ok(line) => println!("{line}"),
                        Err(e) => eprintln!("cannot print an event: {e}"),
                    }
                    if let (Some(p), Event::Progress { bytes_done, bytes_total, .. }) = (cut, &ev) {
                        if bytes_done * 100 >= bytes_total * p && bytes_done < bytes_total {
                            eprintln!("cutting the link at {bytes_done} of {bytes_total} bytes: watch it resume");
                            handle.cut_link();
                            cut = None;
                        }
                    }
                }
                None => break,
            },
            // Ctrl-C: what was verified is committed; the same command continues.
            r = tokio::signal::ctrl_c() => if r.is_ok() { handle.stop() },
        }
    }
    match handle.wait().await {
        Ok(s) => {
            eprintln!(
                "done: {} files, {} bytes verified (root {}); {} already here, {} interruption(s)",
                s.files,
                s.bytes,
                s.root.to_hex(),
                s.resumed_bytes,
                s.interruptions
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("new_device: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
