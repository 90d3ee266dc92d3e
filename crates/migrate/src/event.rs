//! What a running migration reports: a bounded stream of [`Event`]s.
//!
//! Each event serialises (serde) to one JSON object tagged by its name, `{"event": "paired",
//! …}`: the CLI's `--json` output is exactly that, one object per line. Strings in events
//! (device names, paths, reasons) come from the devices as they are; escape them before they
//! reach a terminal ([`crate::text::escape`]).

use std::net::SocketAddr;

use ferry_sync::manifest::ChunkHash;
use ferry_transport::{DeviceId, PairingCode, PeerRole, Ticket};
use serde::{Serialize, Serializer};

/// One thing that happened in a migration, in order. New variants may be added.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    // --- sender: the scan -------------------------------------------------------------
    /// A path in the folder that is not sent (not UTF-8, a FIFO, a link leaving the folder…).
    Skipped { path: String, reason: String },
    /// A database that cannot be read through SQLite: sent as a plain file, checked for
    /// changes while read.
    Database {
        path: String,
        capture: &'static str,
        reason: String,
    },
    /// How the databases were captured: consistent snapshots (`reused` unchanged since the
    /// last scan) and raw copies.
    Databases {
        snapshots: u64,
        reused: u64,
        raw: u64,
    },
    /// A file that kept changing while read: left out of this round.
    Unstable { path: String, reason: String },
    /// The manifest of the history: on the sender after its scan, on the receiver as it
    /// arrived.
    Manifest(ManifestInfo),
    /// `essentials_first`: the databases and small files go as round 1.
    Essentials {
        files: u64,
        bytes: u64,
        #[serde(serialize_with = "hex")]
        root: ChunkHash,
    },
    /// The sender serves only this paired device (`to`).
    ServingOnly {
        peer: String,
        #[serde(serialize_with = "display")]
        device_id: DeviceId,
    },
    /// The pairing code was chosen by the caller: weaker than a random one.
    ChosenCode,
    /// The sender listens: its addresses, pairing code and ticket (`reissued` after a failed
    /// attempt used up the previous code).
    Listening {
        addrs: Vec<SocketAddr>,
        #[serde(serialize_with = "display")]
        code: PairingCode,
        #[serde(serialize_with = "display")]
        ticket: Ticket,
        #[serde(serialize_with = "display")]
        device_id: DeviceId,
        reissued: bool,
        /// Announced on the local network (mDNS): a receiver can find it without the ticket.
        mdns: bool,
        /// The paired receiver of this folder's unfinished migration: it reconnects by its key
        /// (no code); the code is for another device.
        #[serde(skip_serializing_if = "Option::is_none")]
        waiting_for: Option<WaitingFor>,
    },
    /// Local-network discovery (mDNS) is unavailable: the receiver needs the ticket or address.
    DiscoveryUnavailable { reason: String },
    /// Failed pairing attempts in a row: a new code after `retry_in_s`.
    PairingBackoff { failures: u32, retry_in_s: u64 },
    /// Too many failed attempts in a row: pairing paused (`resume`: `"enter"` when the caller
    /// offered [`crate::Handle::resume_pairing`], else `"wait"`).
    PairingPaused {
        failures: u32,
        retry_in_s: u64,
        resume: &'static str,
    },
    /// A device tried a wrong code (that code is now void). Serialised as an `error` event
    /// of kind `pairing`, as before.
    #[serde(rename = "error")]
    WrongCode {
        kind: &'static str,
        message: String,
        addr: SocketAddr,
    },
    /// A paired device other than the `to` device connected and was refused.
    Refused {
        #[serde(serialize_with = "display")]
        device_id: DeviceId,
        addr: SocketAddr,
    },

    // --- receiver: the destination ------------------------------------------------------
    /// Entries of the manifest the destination's file system cannot hold (`reason`; its
    /// symlinks on exFAT or FAT): named before anything is written, then left out; the rest
    /// is migrated and verified, and the receiver exits `incomplete` (10).
    Unrepresentable { paths: Vec<String>, reason: String },

    // --- receiver: finding the sender -------------------------------------------------
    /// The destination holds an unfinished migration: it continues.
    Unfinished,
    /// DEST already holds a finished migration (a receipt, nothing unfinished): the sender is
    /// asked whether anything changed since; it is not needed for what is here.
    FinishedHere,
    /// The destination remembers its sender: reconnecting by its pinned key
    /// (`code_needed: false`, no code asked).
    KnownSender { code_needed: bool },
    /// The sender is not there (yet): the receiver keeps looking until `give_up_s` seconds
    /// have passed (`reason`: what the last attempt found).
    Waiting { reason: String, give_up_s: u64 },
    /// Looking for senders on the local network.
    Looking,
    /// Several senders were found and none is paired with this device: these are offered to
    /// the chooser (or listed in the error without one).
    Candidates { senders: Vec<crate::Candidate> },
    /// A sender found on the local network.
    Found {
        peer: String,
        addrs: Vec<SocketAddr>,
    },

    // --- both ends --------------------------------------------------------------------
    /// The other device is authenticated (newly paired, or by its pinned key).
    Paired(PeerEvent),
    /// Part of the history was already here and verified.
    Resumed {
        bytes_have: u64,
        bytes_total: u64,
        round: u32,
    },
    /// Verified bytes at the receiver (of `bytes_total`; they become durable at the store's
    /// next commit, within seconds — a graceful stop commits them all); `wire_bytes` is the
    /// chunk payload received so far by this run; `files_done` counts the files whose every
    /// chunk is durable here (of `files_total`). `rate_bps` is the chunk payload per second
    /// that crossed the link over the last few seconds of this connection (none until a
    /// second of it, after a reconnect or a stall too: bytes already here never count), and
    /// `eta_s` the time left if the rest crosses at that rate. `phase` is `"receiving"`.
    #[non_exhaustive]
    Progress {
        bytes_done: u64,
        bytes_total: u64,
        wire_bytes: u64,
        files_total: u64,
        files_done: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        rate_bps: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        eta_s: Option<u64>,
        phase: Phase,
    },
    /// The sender's scan as it goes (a few a second): a `progress` event, `phase`
    /// `"scanning"`.
    #[serde(rename = "progress")]
    Scanning(ScanningInfo),
    /// What the sender sent in this round (a few a second, and when the receiver verified
    /// it): a `progress` event, `phase` `"sending"`.
    #[serde(rename = "progress")]
    Sending(SendingInfo),
    /// The receiver verified and committed a round.
    Verified {
        round: u32,
        #[serde(serialize_with = "hex")]
        root: ChunkHash,
        #[serde(skip_serializing_if = "Option::is_none")]
        files: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
    },
    /// Another round starts.
    Round(RoundInfo),
    /// The round limit ended the migration while the folder kept changing.
    StillChanging {
        rounds: u32,
        added: u64,
        changed: u64,
        removed: u64,
        paths: Vec<String>,
    },
    /// The session ended before the migration did: the sender waits for the receiver, the
    /// receiver reconnects.
    Interrupted { message: String, wire_bytes: u64 },
    /// Nothing has come from the sender for `silent_s` seconds (three keep-alives or more):
    /// the link is down or the sender stopped; the receiver keeps the connection a little
    /// longer, then reconnects. Said once per silence; progress resumes when the link does.
    Stalled { silent_s: f64 },
    /// The receiver has a connection to its sender again.
    Reconnected { addr: SocketAddr },
    /// A sender announced itself at new addresses; the receiver tries them too.
    SenderFound { addrs: Vec<String> },
    /// A rescan of the folder failed (the migration goes on with the last good scan).
    RescanFailed { message: String },
    /// The sender did not confirm the end; everything at the receiver is verified.
    Unconfirmed,
    /// The sender could not be reached, but the destination already holds the finished
    /// migration from it (every file verified again just now).
    AlreadyComplete { reason: String },
    /// The sender's migration ended.
    #[serde(rename = "done")]
    Sent(crate::SendSummary),
    /// The receiver's migration ended: verified and committed.
    #[serde(rename = "done")]
    Received(crate::ReceiveSummary),
}

/// What a `progress` event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// The sender reads and hashes its folder.
    Scanning,
    /// The sender serves a round.
    Sending,
    /// The receiver receives and verifies.
    Receiving,
}

/// [`Event::Scanning`]: how far the sender's scan is.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct ScanningInfo {
    pub phase: Phase,
    /// Files described (hashes from the cache or read) of `files_total` (known once the
    /// folder is listed; until then `files_done` is 0 and `files_total` the files found so far).
    pub files_done: u64,
    pub files_total: u64,
    /// Bytes read and hashed of `bytes_total`, the bytes of the files the hash cache does not
    /// know (0 until the folder is listed).
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes hashed per second over the last few seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_bps: Option<u64>,
}

/// [`Event::Sending`]: how far the sender's round is.
///
/// `bytes_done` of `bytes_total` (the round's file bytes) counts what `basis` says:
/// [`Basis::Verified`] with a receiver of this version (protocol 3 or later), which reports
/// the bytes it has verified and made durable a few times a second; [`Basis::Sent`] with an
/// older receiver, which acknowledges nothing before it verified the whole round. Either way
/// `bytes_done` never decreases and is `bytes_total` exactly when the receiver verified the
/// round.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct SendingInfo {
    pub phase: Phase,
    pub round: u32,
    /// See [`SendingInfo`] and [`Basis`].
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Chunk payload handed to the link in this connection (after compression).
    pub wire_bytes: u64,
    pub files_total: u64,
    /// Chunk payload per second over the last few seconds of this connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_bps: Option<u64>,
    /// The time left if the rest crosses at `rate_bps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
    /// What `bytes_done` counts.
    pub basis: Basis,
}

/// What the sender's `bytes_done` counts ([`SendingInfo::basis`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Basis {
    /// Bytes the receiver reported verified and durable (its journal is committed): the ones
    /// it held when the round began plus those it verified since.
    Verified,
    /// What the sender knows without the receiver's word: the bytes it did not ask for plus
    /// the chunk bytes handed to the link in this connection (QUIC flow control keeps that
    /// at most its windows, tens of MiB, ahead of what the receiver has read).
    Sent,
}

/// The figures every `progress` event has, whichever end and phase: see [`Event::progress`].
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct ProgressView {
    pub phase: Phase,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Files done, when that end knows (not the sender while sending).
    pub files_done: Option<u64>,
    pub files_total: u64,
    pub rate_bps: Option<u64>,
    pub eta_s: Option<u64>,
}

impl Event {
    /// The figures of a `progress` event (receiving, scanning or sending), else `None`.
    pub fn progress(&self) -> Option<ProgressView> {
        Some(match self {
            Event::Progress {
                bytes_done,
                bytes_total,
                files_total,
                files_done,
                rate_bps,
                eta_s,
                phase,
                ..
            } => ProgressView {
                phase: *phase,
                bytes_done: *bytes_done,
                bytes_total: *bytes_total,
                files_done: Some(*files_done),
                files_total: *files_total,
                rate_bps: *rate_bps,
                eta_s: *eta_s,
            },
            Event::Scanning(s) => ProgressView {
                phase: s.phase,
                bytes_done: s.bytes_done,
                bytes_total: s.bytes_total,
                files_done: Some(s.files_done),
                files_total: s.files_total,
                rate_bps: s.rate_bps,
                eta_s: None,
            },
            Event::Sending(s) => ProgressView {
                phase: s.phase,
                bytes_done: s.bytes_done,
                bytes_total: s.bytes_total,
                files_done: None,
                files_total: s.files_total,
                rate_bps: s.rate_bps,
                eta_s: s.eta_s,
            },
            _ => return None,
        })
    }
}

/// The manifest figures of [`Event::Manifest`].
#[derive(Clone, Debug, Serialize)]
pub struct ManifestInfo {
    pub files: u64,
    pub bytes: u64,
    /// Distinct chunks.
    pub chunks: u64,
    #[serde(serialize_with = "hex")]
    pub root: ChunkHash,
    /// The sender's scan, when this is the sender's manifest.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub scan: Option<ScanInfo>,
}

/// What the sender's scan cost.
#[derive(Clone, Debug, Serialize)]
pub struct ScanInfo {
    /// Bytes left to send after dedup.
    pub unique_bytes: u64,
    pub hashed_bytes: u64,
    /// Files whose hashes came from the hash cache.
    pub cached_files: u64,
    pub scan_s: f64,
    /// Paths not sent (the first 20 are reported as `skipped` events).
    pub skipped: u64,
}

/// The paired receiver a restarted sender waits for, in [`Event::Listening`].
#[derive(Clone, Debug, Serialize)]
pub struct WaitingFor {
    pub peer: String,
    #[serde(serialize_with = "display")]
    pub device_id: DeviceId,
}

/// The other device, in [`Event::Paired`].
#[derive(Clone, Debug, Serialize)]
pub struct PeerEvent {
    pub peer: String,
    #[serde(serialize_with = "display")]
    pub device_id: DeviceId,
    pub addr: SocketAddr,
    pub newly_paired: bool,
    /// Unix seconds of the pairing that admitted it.
    pub paired_at: u64,
    /// The role it was paired in.
    #[serde(serialize_with = "display")]
    pub role: PeerRole,
}

/// Why a new round starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoundReason {
    /// The folder changed after the receiver verified the last round.
    Changed,
    /// A file changed under the sender's read: the round was cut short.
    SourceChanged,
}

/// [`Event::Round`]: the sender knows the new manifest, the receiver the round it verified.
#[derive(Clone, Debug, Serialize)]
pub struct RoundInfo {
    pub round: u32,
    pub reason: RoundReason,
    /// The file that changed (sender, `source-changed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_hex")]
    pub root: Option<ChunkHash>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files_added: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files_changed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files_removed: Option<u64>,
    /// The root of the round the receiver just verified.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_hex")]
    pub verified_root: Option<ChunkHash>,
    /// The receiver verified this many files in that round.
    #[serde(skip)]
    pub verified_files: Option<u64>,
}

impl RoundInfo {
    pub(crate) fn new(round: u32, reason: RoundReason) -> Self {
        RoundInfo {
            round,
            reason,
            path: None,
            files: None,
            bytes: None,
            root: None,
            files_added: None,
            files_changed: None,
            files_removed: None,
            verified_root: None,
            verified_files: None,
        }
    }
}

/// What both ends report when a migration ends (in [`crate::SendSummary`] and
/// [`crate::ReceiveSummary`], which deref to it; flattened into their `done` events).
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Totals {
    /// The root of the tree the receiver verified last.
    #[serde(serialize_with = "hex")]
    pub root: ChunkHash,
    pub files: u64,
    pub bytes: u64,
    /// Chunk payload that crossed the link, all sessions.
    pub wire_bytes: u64,
    /// The migration's time: not the wait for the other device or at the code prompt.
    pub elapsed_s: f64,
    /// Rounds verified (1 without catch-up).
    pub rounds: u32,
    /// Chunk payload of the rounds after the first.
    pub catchup_wire_bytes: u64,
    /// The first round's tree against the last.
    pub files_added: u64,
    pub files_changed: u64,
    pub files_removed: u64,
    pub end: End,
}

/// How a migration ended (the `end` field of `done`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum End {
    /// The folder stopped changing after the last round.
    Quiescent,
    /// The round limit ended it while the folder kept changing.
    RoundLimit,
    /// Stopped (the handle, Ctrl-C) after a verified round.
    Stopped,
    /// The receiver stopped following, holding a verified round.
    ReceiverStopped,
    /// The receiver holds the complete, verified migration: every entry of the last round,
    /// except those its file system cannot hold (symlinks on exFAT), which were named
    /// ([`Event::Unrepresentable`]) and are listed in the summary's `unrepresentable`
    /// (`complete: false` then, and [`crate::ReceiveSummary::completeness`] is
    /// `Err(Error::Incomplete)`, exit 10).
    Complete,
}

pub(crate) fn hex<S: Serializer>(h: &ChunkHash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&h.to_hex())
}

fn opt_hex<S: Serializer>(h: &Option<ChunkHash>, s: S) -> Result<S::Ok, S::Error> {
    match h {
        Some(h) => s.serialize_str(&h.to_hex()),
        None => s.serialize_none(),
    }
}

fn display<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}
