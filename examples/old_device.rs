//! The old device, with the library API: scan a folder, show the ticket, and serve the
//! migration — catch-up rounds included, like `ferry send` — until the new device confirms the
//! end. Every event is printed to stdout as one JSON line; the ticket also goes to stderr.
//!
//! ```text
//! cargo run --example old_device -- <DIR> [--home STATE_DIR] [--listen ADDR] [--follow]
//!     [--rate BYTES_PER_SEC]
//! ```
//!
//! Then run `new_device` with the ticket. `--home` holds this device's identity, paired devices
//! and hash cache (default: `FERRY_HOME` or the XDG folders, as the CLI); give each device its
//! own when both run on one machine. `--listen` defaults to 127.0.0.1 on a free port; a sender
//! restarted with the same `--home` and `--listen` is found again by the receiver, which
//! resumes on its own. `--follow` keeps serving changes until Ctrl-C. Ctrl-C stops gracefully.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use ferry_migrate::{Event, Migration};
use ferry_transport::FerryDirs;

const USAGE: &str =
    "usage: old_device <DIR> [--home STATE_DIR] [--listen ADDR] [--follow] [--rate BYTES_PER_SEC]";

struct Args {
    dir: PathBuf,
    home: Option<PathBuf>,
    listen: SocketAddr,
    follow: bool,
    rate: Option<u64>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut a = Args {
        dir: PathBuf::new(),
        home: None,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        follow: false,
        rate: None,
    };
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "--home" => a.home = Some(value()?.into()),
            "--listen" => {
                a.listen = value()?
                    .parse()
                    .context("--listen: an address like 127.0.0.1:4433")?
            }
            "--follow" => a.follow = true,
            "--rate" => a.rate = Some(value()?.parse().context("--rate: bytes per second")?),
            "-h" | "--help" => bail!("{USAGE}"),
            s if s.starts_with('-') => bail!("unknown option {s}; {USAGE}"),
            _ if dir.is_none() => dir = Some(PathBuf::from(arg)),
            _ => bail!("{USAGE}"),
        }
    }
    a.dir = dir.context(USAGE)?;
    Ok(a)
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
    // The builder holds every `ferry send` option; mDNS stays off in this example (the
    // receiver uses the ticket).
    let mut send = Migration::send(&args.dir)
        .listen(args.listen)
        .mdns(false)
        .name("old device")
        .follow(args.follow);
    if let Some(home) = &args.home {
        send = send.dirs(FerryDirs::under(home));
    }
    if let Some(rate) = args.rate {
        send = send.limit_rate(rate);
    }
    let (handle, mut events) = send.start();
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(ev) => {
                    if let Event::Listening { ticket, reissued, .. } = &ev {
                        let again = if *reissued { " (new code)" } else { "" };
                        eprintln!("ticket{again}: {ticket}");
                        eprintln!("on the new device: cargo run --example new_device -- <DEST> {ticket}");
                    }
                    match ferry_migrate::text::json_line(&ev) {
                        Ok(line) => println!("{line}"),
                        Err(e) => eprintln!("cannot print an event: {e}"),
                    }
                }
                None => break,
            },
            // Like Ctrl-C in `ferry send`: a round the receiver verified ends cleanly,
            // otherwise the next run continues.
            r = tokio::signal::ctrl_c() => if r.is_ok() { handle.stop() },
        }
    }
    match handle.wait().await {
        Ok(s) => {
            eprintln!(
                "done: {} files, {} bytes in {} round(s), root {}",
                s.files,
                s.bytes,
                s.rounds,
                s.root.to_hex()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The message says what happened and what to do; the kind is the CLI's exit code.
            eprintln!("old_device: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
