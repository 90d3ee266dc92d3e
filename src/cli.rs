//! Command-line flags: parsed here, validated into settings by each command.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Move a chat history from an old device to a new one over your own network: resumable, verified, fast.",
    after_help = "Exit codes: 0 ok, 1 internal error, 2 usage, 3 pairing failed, 4 peer unreachable, \
                  5 interrupted (run the same command again to continue), 6 destination problem, \
                  7 integrity failure, 8 source problem, 9 protocol/version mismatch, \
                  10 incomplete (finished and verified, but named entries were left out: files that kept \
                  changing were not sent, or symlinks the destination's file system cannot hold, \
                  as on exFAT, were not created)."
)]
pub struct Cli {
    /// More logging (-v info, -vv debug) on stderr.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a history folder to a new device (run on the old device).
    Send(SendFlags),
    /// Receive a history into a folder (run on the new device); resumes automatically.
    Receive(ReceiveFlags),
    /// Pair with another device without transferring anything.
    Pair(PairFlags),
    /// List or forget paired devices.
    Peers(PeersFlags),
    /// Re-hash a received folder against its completion receipt.
    Verify(VerifyFlags),
    /// Diagnose discovery: interfaces, multicast, what to try.
    Doctor(DoctorFlags),
    /// Generate a sample history and migrate it between two local endpoints.
    Demo(DemoFlags),
}

#[derive(Debug, Args)]
pub struct SendFlags {
    /// The history folder to send.
    pub dir: PathBuf,
    /// Use this pairing code instead of a random one (weaker: anyone who guesses it can pair).
    /// `--code -` reads it from standard input: other local users can see a command line.
    #[arg(long, value_name = "CODE|-")]
    pub code: Option<String>,
    /// Listen on this address (default: all interfaces, a random port).
    #[arg(long)]
    pub listen: Option<String>,
    /// Do not announce on the local network (mDNS); use the ticket or address instead.
    #[arg(long)]
    pub no_mdns: bool,
    /// The name the other device sees.
    #[arg(long)]
    pub name: Option<String>,
    /// One JSON event per line on stdout.
    #[arg(long)]
    pub json: bool,
    /// Congestion controller for the data this device sends: bbr (default; holds up under
    /// random loss) or cubic.
    #[arg(long, default_value = "bbr", value_parser = ["bbr", "cubic"])]
    pub congestion: String,
    /// After the receiver verified a round, rescan; while the folder keeps changing, send what
    /// changed in catch-up rounds, at most this many rounds in all (including the first).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rounds: u32,
    /// Keep the pair in sync until stopped (Ctrl-C): after each round, watch the folder and send
    /// every change in a new round. No round limit.
    #[arg(long)]
    pub follow: bool,
    /// With --follow: seconds between rescans of an unchanged folder.
    #[arg(long, default_value_t = 2.0)]
    pub poll_interval: f64,
    /// Cap the rate of chunk data sent, per second (e.g. 20MB, 5MiB), to leave room on a shared
    /// network. Default: as fast as the link allows.
    #[arg(long, value_name = "SIZE")]
    pub limit_rate: Option<String>,
    /// When to compress compressible chunks (message databases, text; media never are):
    /// auto (default) over a network but not to a receiver on this machine; always; never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub compress: String,
    /// Send the databases and small files (up to 1 MiB) as a round of their own first: the new
    /// device holds a verified, usable chat history before the large media arrive.
    #[arg(long)]
    pub essentials_first: bool,
    /// Serve only this paired device (its name or id, as `ferry peers` lists them): any other
    /// device is refused, even one that knows the code.
    #[arg(long, value_name = "NAME|ID")]
    pub to: Option<String>,
    /// A paired device not used for this many days needs the code again.
    #[arg(long, value_name = "DAYS", default_value_t = 30)]
    pub pairing_ttl: u32,
}

#[derive(Debug, Args)]
pub struct ReceiveFlags {
    /// Where the history goes. On a file system without symlinks (exFAT, FAT) the history's
    /// symlinks are named and left out, the rest is received and verified: exit 10.
    pub dest: PathBuf,
    /// The pairing code shown on the old device. `--code -` reads it from standard input;
    /// without --code, the FERRY_CODE environment variable is used. Prefer those: other local
    /// users can see a command line (/proc), not standard input or the environment.
    #[arg(long, value_name = "CODE|-")]
    pub code: Option<String>,
    /// Connect to this sender address (host:port) instead of searching the network.
    #[arg(long, conflicts_with = "ticket")]
    pub connect: Option<String>,
    /// Connect and pair with the ticket shown on the old device (addresses, key and code: a
    /// secret until used). `--ticket -` reads it from standard input; without --ticket and
    /// --connect, the FERRY_TICKET environment variable is used.
    #[arg(long, value_name = "TICKET|-")]
    pub ticket: Option<String>,
    /// When several senders are on the local network: the one with this name (or the paired
    /// device with this name or id). Without it, a paired sender is chosen, else you are asked
    /// (on a terminal).
    #[arg(long, value_name = "NAME|ID", conflicts_with_all = ["connect", "ticket"])]
    pub from: Option<String>,
    /// Receive into a folder that already holds other files: ferry never deletes them, but
    /// replaces files at the same paths as the history's.
    #[arg(long)]
    pub yes: bool,
    /// Re-read and re-hash every file before it moves into place (chunks are verified on
    /// arrival and durable before they count; by default only files an interrupted run
    /// journaled are read back).
    #[arg(long)]
    pub verify_at_end: bool,
    /// One JSON event per line on stdout.
    #[arg(long)]
    pub json: bool,
    /// Give up reconnecting after this many seconds without a connection.
    #[arg(long, default_value_t = 3600)]
    pub give_up_after: u64,
    /// The name the other device sees.
    #[arg(long)]
    pub name: Option<String>,
    /// A paired sender not used for this many days needs the code again.
    #[arg(long, value_name = "DAYS", default_value_t = 30)]
    pub pairing_ttl: u32,
}

#[derive(Debug, Args)]
pub struct PairFlags {
    /// Pair with the device that shows this ticket (a secret until used). `--ticket -` reads
    /// it from standard input; without --ticket and --connect, FERRY_TICKET is used.
    #[arg(long, value_name = "TICKET|-")]
    pub ticket: Option<String>,
    /// Pair with the device at this address (with --code).
    #[arg(long)]
    pub connect: Option<String>,
    /// The code shown on the other device (or, when waiting, the code to use). `--code -`
    /// reads it from standard input; with --connect and without --code, FERRY_CODE is used.
    /// Other local users can see a command line (/proc), not standard input or the environment.
    #[arg(long, value_name = "CODE|-")]
    pub code: Option<String>,
    /// Listen on this address when waiting for the other device.
    #[arg(long)]
    pub listen: Option<String>,
    /// The name the other device sees.
    #[arg(long)]
    pub name: Option<String>,
    /// One JSON event per line on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PeersFlags {
    /// Forget this device (its id, or its name).
    #[arg(long)]
    pub forget: Option<String>,
    /// One JSON event per line on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyFlags {
    /// A folder that received a history.
    pub dir: PathBuf,
    /// One JSON event per line on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DoctorFlags {
    /// One JSON event per line on stdout.
    #[arg(long)]
    pub json: bool,
    /// Skip the multicast self-test (it sends mDNS packets on your local network).
    #[arg(long)]
    pub no_multicast_test: bool,
}

#[derive(Debug, Args)]
pub struct DemoFlags {
    /// Size of the generated history (e.g. 64MiB, 2GiB).
    #[arg(long, default_value = "64MiB")]
    pub size: String,
    /// Work in this folder (kept afterwards) instead of a temporary one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seed of the generated history.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Do not interrupt the link midway.
    #[arg(long)]
    pub no_interrupt: bool,
    /// One JSON event per line on stdout.
    #[arg(long)]
    pub json: bool,
}
