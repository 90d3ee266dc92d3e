//! ferry: move a chat history from an old device to a new one over your own network.
//!
//! The binary reads like a table of contents: flags are parsed in [`cli`] and turned into a
//! migration of the `ferry-migrate` library; its events are rendered for a person or as JSON
//! ([`render`]); its error becomes the exit code and a message that says what to do.

mod args;
mod cli;
mod demo;
mod misc;
mod output;
mod render;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ferry_migrate::{Compress, Error, ErrorKind, Event, Events, Handle, Migration};
use serde_json::json;

use crate::cli::{Cli, Command, ReceiveFlags, SendFlags};
use crate::output::Reporter;
use crate::render::Side;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match cli.verbose {
        0 => "warn",
        1 => "info,quinn=warn",
        _ => "debug",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        // Log lines may quote peers (device names, close reasons, paths): every control
        // character is escaped on the way out, and so log lines carry no colour codes.
        .with_ansi(false)
        .with_writer(|| output::EscapingWriter(std::io::stderr()))
        .try_init();
    // Thousands of tiny files: ferry bounds its descriptors, but leave SQLite and the rest room.
    let _ = ferry_sync::platform::raise_open_file_limit();
    let json = match &cli.command {
        Command::Send(f) => f.json,
        Command::Receive(f) => f.json,
        Command::Pair(f) => f.json,
        Command::Peers(f) => f.json,
        Command::Verify(f) => f.json,
        Command::Doctor(f) => f.json,
        Command::Demo(f) => f.json,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start: {e}");
            return ExitCode::from(ErrorKind::Internal.exit_code());
        }
    };
    let result = rt.block_on(run(cli.command));
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json {
                Reporter::new(true).event(
                    "error",
                    json!({"kind": f.kind().as_str(), "message": f.message()}),
                );
            }
            eprintln!("ferry: {}", output::escape_lines(f.message()));
            ExitCode::from(f.exit_code())
        }
    }
}

async fn run(command: Command) -> Result<(), Error> {
    match command {
        Command::Send(f) => send(f).await,
        Command::Receive(f) => receive(f).await,
        Command::Pair(f) => misc::pair(f).await,
        Command::Peers(f) => misc::peers(f).await,
        Command::Verify(f) => misc::verify(f).await,
        Command::Doctor(f) => misc::doctor_cmd(f).await,
        Command::Demo(f) => demo::run(f).await,
    }
}

fn usage(message: String) -> Error {
    Error::new(ErrorKind::Usage, message)
}

async fn send(f: SendFlags) -> Result<(), Error> {
    use std::io::IsTerminal;
    let rep = Reporter::new(f.json);
    let mut m = Migration::send(&f.dir)
        .dirs(ferry_migrate::dirs_from_env()?)
        .mdns(!f.no_mdns)
        .congestion(if f.congestion == "cubic" {
            ferry_transport::Congestion::Cubic
        } else {
            ferry_transport::Congestion::Bbr
        })
        .compress(match f.compress.as_str() {
            "always" => Compress::Always,
            "never" => Compress::Never,
            _ => Compress::Auto,
        })
        .max_rounds(f.max_rounds)
        .follow(f.follow)
        .poll_interval(args::parse_interval(f.poll_interval)?)
        .essentials_first(f.essentials_first)
        .pairing_ttl(args::parse_pairing_ttl(f.pairing_ttl)?)
        // Enter resumes a paused pairing when a person is at the terminal.
        .resumable_pause(!f.json && std::io::stdin().is_terminal());
    // The sender's own code is never taken from FERRY_CODE (that names the code shown by the
    // other device).
    if let Some(c) = args::code_arg(f.code.as_deref(), None, &mut false)? {
        m = m.code(c);
    }
    if let Some(a) = f.listen.as_deref().map(args::parse_addr).transpose()? {
        m = m.listen(a[0]);
    }
    if let Some(n) = f.name {
        m = m.name(n);
    }
    if let Some(to) = f.to {
        m = m.to(to);
    }
    if let Some(v) = f.limit_rate.as_deref() {
        let rate = output::parse_size(v.trim_end_matches("/s"))
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                usage(format!(
                    "--limit-rate {v}: give a positive size per second, e.g. 20MB or 5MiB"
                ))
            })?;
        m = m.limit_rate(rate);
    }
    let (handle, events) = m.start();
    let summary = drive(handle, events, &rep, Side::Send, &f.dir, |_, _| {}).await?;
    summary.completeness()
}

async fn receive(f: ReceiveFlags) -> Result<(), Error> {
    let rep = Reporter::new(f.json);
    let mut stdin_taken = false;
    // FERRY_TICKET only when no address is given either.
    let ticket_env = f.connect.is_none().then_some("FERRY_TICKET");
    let ticket = args::ticket_arg(f.ticket.as_deref(), ticket_env, &mut stdin_taken)?;
    let code = args::code_arg(f.code.as_deref(), Some("FERRY_CODE"), &mut stdin_taken)?;
    let mut m = Migration::receive(&f.dest)
        .dirs(ferry_migrate::dirs_from_env()?)
        .accept_nonempty(f.yes)
        .verify_at_end(f.verify_at_end)
        .give_up_after(Duration::from_secs(f.give_up_after))
        .pairing_ttl(args::parse_pairing_ttl(f.pairing_ttl)?)
        .prompt(Arc::new(args::TerminalPrompt));
    if !f.json && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        m = m.chooser(Arc::new(args::TerminalChooser));
    }
    if let Some(w) = f.from {
        m = m.from(w);
    }
    if let Some(t) = ticket {
        m = m.ticket(t);
    }
    if let Some(c) = code {
        m = m.code(c);
    }
    if let Some(a) = f.connect.as_deref().map(args::parse_addr).transpose()? {
        m = m.connect(a);
    }
    if let Some(n) = f.name {
        m = m.name(n);
    }
    let (handle, events) = m.start();
    let r = drive(handle, events, &rep, Side::Receive, &f.dest, |_, _| {}).await;
    rep.finish_progress();
    r?.completeness()
}

/// Renders a migration's events until it ends; Ctrl-C stops it gracefully; Enter resumes a
/// paused pairing. `watch` sees every event with the handle (the demo cuts the link with it).
pub(crate) async fn drive<T>(
    handle: Handle<T>,
    mut events: Events,
    rep: &Reporter,
    side: Side,
    place: &Path,
    mut watch: impl FnMut(&Event, &Handle<T>),
) -> Result<T, Error> {
    let mut enter: Option<tokio::sync::mpsc::Receiver<()>> = None;
    let mut paused = false;
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(ev) => {
                    render::show(rep, &ev, side, place);
                    match &ev {
                        Event::PairingPaused { resume: "enter", .. } => {
                            paused = true;
                            enter.get_or_insert_with(read_enter);
                        }
                        Event::Listening { .. } => paused = false,
                        _ => {}
                    }
                    watch(&ev, &handle);
                }
                None => break,
            },
            r = tokio::signal::ctrl_c() => {
                if r.is_ok() {
                    handle.stop();
                }
            }
            Some(()) = async { match enter.as_mut() { Some(rx) => rx.recv().await, None => None } } => {
                if paused {
                    handle.resume_pairing();
                }
            }
        }
    }
    handle.wait().await
}

/// Lines typed on the terminal (Enter), read on a plain thread: a read blocked on the terminal
/// must not hold up the exit.
fn read_enter() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::spawn(move || {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
            line.clear();
            if tx.blocking_send(()).is_err() {
                break;
            }
        }
    });
    rx
}
