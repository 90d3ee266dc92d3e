//! ferry's whole migration as a library: what `ferry send` and `ferry receive` do, for apps
//! that embed it.
//!
//! A migration is started from a builder ([`Migration::send`] on the old device,
//! [`Migration::receive`] on the new one) and returns a [`Handle`] (stop, cancel, cut the link,
//! wait for the end) and a bounded stream of typed [`Event`]s. Everything the CLI does lives
//! here — rounds and catch-up, resume after a lost link, roaming, replacing a stale connection,
//! issuing a new pairing code after a failed attempt, reusing the last port, confirming the
//! end — and the `ferry` binary only parses flags, renders events and maps errors to exit
//! codes.
//!
//! ```no_run
//! use ferry_migrate::{Event, Migration};
//! use ferry_transport::FerryDirs;
//!
//! # async fn demo() -> Result<(), ferry_migrate::Error> {
//! // The old device: serve a folder (here without mDNS, on loopback).
//! let (sender, mut sent) = Migration::send("/data/chat-history")
//!     .dirs(FerryDirs::under("/tmp/old-device"))
//!     .listen("127.0.0.1:0".parse().unwrap())
//!     .mdns(false)
//!     .start();
//! // Its first `listening` event carries the ticket (addresses, key, code) for the new device.
//! let ticket = loop {
//!     match sent.next().await {
//!         Some(Event::Listening { ticket, .. }) => break ticket,
//!         Some(_) => continue,
//!         None => return sender.wait().await.map(|_| ()),
//!     }
//! };
//! // The new device: receive into a folder; it resumes on its own after a lost link.
//! let (receiver, mut received) = Migration::receive("/data/new-history")
//!     .dirs(FerryDirs::under("/tmp/new-device"))
//!     .ticket(ticket)
//!     .start();
//! while let Some(ev) = received.next().await {
//!     if let Event::Progress { bytes_done, bytes_total, .. } = ev {
//!         println!("{bytes_done} of {bytes_total} bytes verified");
//!     }
//! }
//! let summary = receiver.wait().await?;
//! println!("{} files verified, root {}", summary.files, summary.root.to_hex());
//! sender.wait().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Events
//!
//! Every event serialises to one JSON object tagged by its name (`{"event": "paired", …}`):
//! the CLI's `--json` output. In the order a migration meets them:
//!
//! | event | side | when |
//! |---|---|---|
//! | `progress` (`phase: "scanning"`, [`Event::Scanning`]) | sender | the first scan as it goes: files and bytes hashed |
//! | `skipped`, `database`, `databases`, `unstable` | sender | what the scan left out or how it captured the databases |
//! | `manifest` | both | the history's files, bytes, chunks and root (the sender adds its scan figures) |
//! | `essentials` | sender | `essentials_first`: round 1 holds the databases and small files |
//! | `serving_only`, `chosen_code` | sender | the `to` device; a chosen (weaker) code |
//! | `listening` | sender | addresses, code, ticket; again with `reissued` after a failed attempt |
//! | `pairing_backoff`, `pairing_paused`, `error` (kind `pairing`), `refused` | sender | failed or refused attempts |
//! | `unfinished`, `known_sender`, `looking`, `found` | receiver | how the sender is found |
//! | `paired` | both | the other device, newly paired or by its pinned key |
//! | `unrepresentable` | receiver | entries DEST's file system cannot hold (symlinks on exFAT), named before anything is written; left out |
//! | `resumed`, `progress` (`phase: "receiving"`) | receiver | what was already here; verified bytes and files, rate |
//! | `progress` (`phase: "sending"`, [`Event::Sending`]) | sender | what it sent of the round, rate |
//! | `stalled` | receiver | nothing from the sender for three keep-alives |
//! | `verified` | both | a round is verified and committed |
//! | `round`, `still_changing` | both | catch-up rounds; the round limit hit |
//! | `interrupted`, `reconnected`, `sender_found` | both | a lost link and its repair |
//! | `rescan_failed`, `unconfirmed`, `already_complete` | | warnings |
//! | `done` | both | the summary ([`SendSummary`], [`ReceiveSummary`]) |
//!
//! # Errors
//!
//! [`Error`]'s variants are the classes of failure; each is one exit code of the CLI.
//!
//! | variant | exit | meaning |
//! |---|---|---|
//! | `Internal` | 1 | a bug, or an environment ferry cannot run in |
//! | `Usage` | 2 | bad options or input; a code is needed and no one can be asked |
//! | `Pairing` | 3 | wrong or missing code; not paired (or no longer) |
//! | `Unreachable` | 4 | the other device cannot be reached |
//! | `Interrupted` | 5 | stopped or cut off; starting again continues |
//! | `Destination` | 6 | the destination cannot take the history (space, permissions, names) |
//! | `Integrity` | 7 | data failed verification |
//! | `Source` | 8 | the folder being sent cannot be read, or a file never held still |
//! | `Protocol` | 9 | another protocol version, or a broken peer |
//! | `Incomplete` | 10 | finished and verified, but something named was left out: files that kept changing (sender, [`SendSummary::completeness`]), or entries the destination cannot hold, symlinks on exFAT (receiver, [`ReceiveSummary::completeness`]) |
//!
//! # The connection
//!
//! The sync protocol itself (frames, rounds, verification) is specified in
//! [`ferry_sync::proto`]. Around it, on each authenticated QUIC connection:
//!
//! - **Streams.** A session (one round) is one bidirectional control stream, opened by the
//!   receiver, and [`session::DATA_LANES`] unidirectional data streams opened by the sender.
//!   Catch-up rounds run one after the other on the same connection, each on new streams.
//! - **Refusal.** A sender that must end the migration with a reason (a file that never held
//!   still) answers the next control stream with its hello and a `Close` frame, then waits for
//!   the receiver to close.
//! - **One receiver at a time.** While a session runs, the same device connecting again
//!   replaces the old connection (closed with [`close::REPLACED`](ferry_transport::close::REPLACED)):
//!   a receiver that was killed never closes its connection. Any other device is closed with
//!   [`close::BUSY`](ferry_transport::close::BUSY).
//! - **Roaming.** When the link has been silent for six keep-alives and the sender answers at
//!   another of its addresses, the receiver moves to the new connection and closes the old one
//!   with `REPLACED`.
//! - **Close codes** (all in [`ferry_transport::close`]): `COMPLETE` (0x100) from the sender
//!   once it read the receiver's last round — the receiver waits for it before it exits;
//!   `RECEIVER_STOPPED` (0x104) from a receiver stopped holding a verified round (the sender
//!   ends cleanly); `STOPPED` (0x105) from a side stopped mid-round (the other keeps what it
//!   verified and waits or reconnects); `LINK_CUT` (0x101) for [`Handle::cut_link`]. Codes
//!   below 0x100 belong to the transport (pairing, handshake).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod device;
mod error;
mod event;
mod handle;
mod progress;
mod receive;
mod send;
pub mod session;
pub mod text;

pub use device::{dirs_from_env, find_peer, open_endpoint, peer_store, IDLE_TIMEOUT, KEEP_ALIVE};
pub use error::{Cause, Error, ErrorKind};
pub use event::{
    Basis, End, Event, ManifestInfo, PeerEvent, Phase, ProgressView, RoundInfo, RoundReason,
    ScanInfo, ScanningInfo, SendingInfo, Totals, WaitingFor,
};
pub use handle::{Events, Handle, EVENT_CAPACITY};
pub use receive::{ReceiveBuilder, ReceiveSummary};
pub use send::{
    Compress, SendBuilder, SendSummary, ESSENTIAL_MAX_SIZE, MAX_RESTARTS, MAX_RESTARTS_PER_FILE,
};

use std::path::PathBuf;

use ferry_transport::PairingCode;

/// Where migrations start.
#[derive(Debug, Clone, Copy)]
pub struct Migration;

impl Migration {
    /// A sender of the history folder `dir` (the old device).
    pub fn send(dir: impl Into<PathBuf>) -> SendBuilder {
        SendBuilder::new(dir)
    }

    /// A receiver into the folder `dest` (the new device); it continues an unfinished
    /// migration found there.
    pub fn receive(dest: impl Into<PathBuf>) -> ReceiveBuilder {
        ReceiveBuilder::new(dest)
    }
}

/// A sender found on the local network, offered to a [`SenderChooser`] (the name is what the
/// device announces: not authenticated until pairing).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Candidate {
    pub name: String,
    pub addrs: Vec<std::net::SocketAddr>,
    /// Unix seconds when its announcement was last seen on the network.
    pub seen_at: u64,
    /// A device paired with this one answered there by its pinned key but did not let this
    /// device in (it forgot this device, or serves only another one): a code is needed again.
    /// A paired sender that lets this device in is chosen by itself and never listed.
    pub paired: bool,
}

/// Lets a person pick the sender when several are found and none is paired with this device.
/// Called off the async threads: it may block.
pub trait SenderChooser: Send + Sync {
    /// The index of the chosen candidate; an error ends the migration with it.
    fn choose(&self, candidates: &[Candidate]) -> Result<usize, Error>;
}

/// Asks a person for the pairing code shown on the other device, when one is needed and none
/// was given. Called off the async threads: it may block (the CLI reads the terminal).
pub trait CodePrompt: Send + Sync {
    /// The code shown on `sender` (its name or address). An error ends the migration with it.
    fn ask(&self, sender: &str) -> Result<PairingCode, Error>;
}
