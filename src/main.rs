//! ferry: move a chat history from an old device to a new one over your own network.
//!
//! The binary reads like a table of contents: flags are parsed in [`cli`], each command turns
//! them into settings and calls the libraries (`ferry-sync`, `ferry-transport`); failures carry
//! an exit code ([`exit`]) and a message that says what to do.

mod cli;
mod common;
mod demo;
mod exit;
mod misc;
mod output;
mod receive;
mod send;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

use crate::cli::{Cli, Command};
use crate::exit::{Exit, Failure};
use crate::output::Reporter;

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
            return ExitCode::from(Exit::Internal as u8);
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
                    json!({"kind": f.exit.kind(), "message": f.message}),
                );
            }
            eprintln!("ferry: {}", output::escape_lines(&f.message));
            ExitCode::from(f.exit as u8)
        }
    }
}

async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Send(f) => {
            let rep = Reporter::new(f.json);
            let settings = send::SendSettings {
                // The sender's own code is never taken from FERRY_CODE (that names the code shown
                // by the other device).
                code: common::code_arg(f.code.as_deref(), None, &mut false)?,
                listen: f
                    .listen
                    .as_deref()
                    .map(common::parse_addr)
                    .transpose()?
                    .and_then(|v| v.first().copied()),
                mdns: !f.no_mdns,
                congestion: if f.congestion == "cubic" {
                    ferry_transport::Congestion::Cubic
                } else {
                    ferry_transport::Congestion::Bbr
                },
                name: f.name,
                dirs: common::dirs()?,
                dir: f.dir,
                limit_rate: f
                    .limit_rate
                    .as_deref()
                    .map(|v| {
                        output::parse_size(v.trim_end_matches("/s"))
                            .ok()
                            .filter(|&n| n > 0)
                            .map(ferry::session::RateLimit::new)
                            .ok_or_else(|| {
                                Failure::new(
                                    Exit::Usage,
                                    format!("--limit-rate {v}: give a positive size per second, e.g. 20MB or 5MiB"),
                                )
                            })
                    })
                    .transpose()?,
                compress: match f.compress.as_str() {
                    "always" => send::Compress::Always,
                    "never" => send::Compress::Never,
                    _ => send::Compress::Auto,
                },
                rounds: send::RoundSettings {
                    max_rounds: f.max_rounds,
                    follow: f.follow,
                    poll_interval: common::parse_interval(f.poll_interval)?,
                    essentials_first: f.essentials_first,
                },
                to: f.to,
                pairing_ttl: common::parse_pairing_ttl(f.pairing_ttl)?,
            };
            send::run(settings, &rep, None).await?.completeness()
        }
        Command::Receive(f) => {
            let rep = Reporter::new(f.json);
            let mut stdin_taken = false;
            // FERRY_TICKET only when no address is given either.
            let ticket_env = f.connect.is_none().then_some("FERRY_TICKET");
            let ticket = common::ticket_arg(f.ticket.as_deref(), ticket_env, &mut stdin_taken)?;
            let settings = receive::ReceiveSettings {
                code: common::code_arg(f.code.as_deref(), Some("FERRY_CODE"), &mut stdin_taken)?,
                connect: f.connect.as_deref().map(common::parse_addr).transpose()?,
                ticket,
                yes: f.yes,
                give_up: Duration::from_secs(f.give_up_after),
                name: f.name,
                dirs: common::dirs()?,
                interrupt_at: None,
                pairing_ttl: common::parse_pairing_ttl(f.pairing_ttl)?,
                dest: f.dest,
            };
            receive::run(settings, &rep).await.map(|_| ())
        }
        Command::Pair(f) => misc::pair(f).await,
        Command::Peers(f) => misc::peers(f).await,
        Command::Verify(f) => misc::verify(f).await,
        Command::Doctor(f) => misc::doctor_cmd(f).await,
        Command::Demo(f) => demo::run(f).await,
    }
}
