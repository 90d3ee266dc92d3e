//! The migration protocol.
//!
//! # Participants and goal
//! The **sender** (old device) owns a history directory, described by a [`Manifest`]. The
//! **receiver** (new device) owns a destination directory and its store (staging + journal). The
//! goal: the destination ends up holding exactly the manifest's tree, every byte verified against
//! its BLAKE3 hash, atomically committed, with a receipt naming the manifest's root hash — and any
//! interruption costs at most the chunks in flight.
//!
//! # Session
//! One session runs over one connection: a bidirectional **control** stream plus any number of
//! unidirectional **data** streams from sender to receiver. Frames are defined in [`frame`].
//!
//! 1. Both sides send a `Hello` (magic, version, role) first on the control stream. A bad magic or
//!    unknown version closes the session with [`CloseCode::UnsupportedVersion`].
//! 2. The sender streams the manifest in bounded `Manifest` frames (entries sorted by path) and
//!    closes it with `ManifestEnd` (root hash and totals); with version 4 it may do so while it
//!    still scans, and chunks may flow before the end (see "Streaming"). The receiver validates every entry as it
//!    arrives (paths, ordering, chunk counts, limits) and checks the root at the end.
//! 3. The receiver asks its store what it already holds (journal of verified, durable chunks, and
//!    files already in place), reuses local copies of duplicate chunks, and sends `Want` ranges of
//!    unique-chunk ids it still needs, then `WantEnd`.
//! 4. The sender reads wanted chunks (bounded read-ahead), compresses them per policy and sends
//!    them as chunk frames on the data streams, in want order, on whichever stream is free.
//! 5. The receiver verifies each chunk (decode bounded by the declared length, hash check) before
//!    writing it to the staging area; verified chunks become durable in group commits (data fsync,
//!    then journal append + fsync). A chunk that fails verification is answered with `Rejected`
//!    and wanted again; the sender re-reads it and checks it against the manifest (a source file
//!    that changed underneath is reported by name). A chunk that was never wanted is a protocol
//!    violation.
//!    With a version-3 (or later) sender, the receiver reports how far it is: `Durable{bytes}`
//!    on the control stream, the round's file bytes that are verified and durable here (what was
//!    already here, then each group commit adds), right after `WantEnd` and after commits, at
//!    most every 250 ms (the last commit of the round is always reported), and only when the
//!    figure grew. The sender shows it as confirmed progress; it is a peer's claim, so the
//!    sender clamps it to the round's total and ignores any figure below the highest so far.
//! 6. When every slot is durable, the receiver finalizes (re-verifies each file from disk, fsyncs,
//!    renames it into place, fsyncs directories, writes the receipt) and sends `Done{root}`.
//! 7. The sender answers with its **verdict** on the control stream: `Close{Done}` ends the
//!    migration (the receiver's tree is final), or `NextRound` (version ≥ 2) says the source
//!    changed meanwhile and another round follows. After `NextRound` both sides finish this
//!    session and the receiver opens a new control stream on the same connection; the sender
//!    opens new data streams; the round runs steps 1–7 with the sender's new manifest. The
//!    receiver's store reuses everything it holds (files in place from the previous round,
//!    verified chunks in its journal), so only changed chunks cross. The sender may take its
//!    time with the verdict (it rescans; with `--follow` it waits for the next change).
//!
//! # Streaming (version 4)
//! A sender need not hash the whole history before it listens. A **streaming** sender
//! ([`Sender::streaming`]) announces entries in `Manifest` frames as its scan finishes them —
//! still in path order, each with all its chunk hashes (a hash-cache hit is announced at once) —
//! and sends `ManifestEnd` (root and totals) when the scan ends. Entry, slot and unique-chunk
//! ids are assigned in announcement order and never change, so every prefix of the manifest is
//! a manifest of its own whose ids stay true: the sender accepts `Want` ranges up to the chunks
//! announced so far, and serves them at once.
//!
//! A receiver whose destination holds nothing of any history ([`ReceiverConfig::stream`], from
//! [`FsStore::is_fresh`](crate::store::FsStore::is_fresh)) facing a version-4 sender asks for
//! chunks while the manifest streams in. It prepares its store for a **prefix** of the
//! manifest — the first entries, then a prefix at least twice as long as the last one, or any
//! longer prefix while nothing it asked for is outstanding — and sends `Want` ranges for the
//! chunks that prefix adds (in the prefix's transfer order; chunks already here are copied
//! locally, as in step 3). Before each new prefix it stops taking chunks until its stores and
//! group commit settle (preparing compacts the journal; nothing uncommitted may be lost), so
//! the number of prefixes grows with the logarithm of the history, and so does the cost of
//! re-preparing. On `ManifestEnd` it checks the root and totals **before** anything more is
//! asked or finalized: a mismatch fails the session (`ManifestRejected`); what was verified
//! stays committed in the journal (keyed by file, offset and hash, so only a manifest naming the
//! same content reuses it) and nothing reaches a final path. Then it prepares the store for the
//! whole manifest, sends the last `Want` ranges and `WantEnd` (totals over the session), and the
//! session goes on at step 4. Finalize still waits for every slot and the checked root.
//!
//! Streaming never changes what a session writes, only when chunks start to flow. A store that
//! already holds something (a resume, a catch-up round, a receipt) waits for the whole manifest
//! as before: preparing it for a prefix would drop journal records and staging files of entries
//! not yet announced. So does a receiver facing a sender of version 3 or older. The sender's
//! order is the path order of its scan; within each prefix the receiver fetches databases
//! first, then small files (`--essentials-first` still serves its early subset as a round of
//! its own). While nothing is wanted a streaming receiver waits ten stall timeouts (not one)
//! for the next entries: a sender may hash one large file for minutes.
//!
//! # Rounds cut short
//! When a source file changes under a read (a re-read chunk no longer matches the manifest, or
//! the file shrank or vanished), a sender of version 2 or later sends `NextRound` at once
//! instead of failing: the receiver stops asking, commits every chunk it verified, and ends the
//! session; the next round (new manifest from a rescan) reuses those chunks, since the journal
//! is keyed by file, offset and chunk hash, not by manifest. The application bounds how often one file may do this
//! before it is reported by name.
//!
//! # Versions
//! The hello carries the protocol version. This build speaks [`PROTOCOL_VERSION`] (4) and
//! accepts peers down to [`MIN_PROTOCOL_VERSION`] (1); each side uses a feature only when the
//! peer's hello says it knows it. Version 4 adds no frame: it allows `Want` (and chunks) before
//! `ManifestEnd` (see "Streaming"). A version-4 receiver never asks early of an older sender,
//! and an older receiver never asks early, so a version-4 sender (streaming or not) serves it
//! manifest-first; a peer newer than this build is refused in the hello with both versions
//! named ([`FrameError::UnsupportedVersion`]). A version-1 peer knows no `NextRound`:
//! a sender facing one closes with `Done` right after the receiver's `Done` (one round) and
//! fails with a source error when a file changes under a read, as version 1 did; a receiver
//! reads a version-1 sender's `Close{Done}` as the final verdict. A peer below version 3 knows
//! no `Durable`: a receiver never sends it to such a sender (an older decoder would refuse the
//! frame), and a sender facing such a receiver learns nothing before `Done` (its
//! [`SendEvent::Wanted`] says so: `reports_durable: false`); a `Durable` from a receiver whose
//! hello said version 1 or 2 is a protocol violation.
//!
//! Either side may send `Close{code, reason}` at any point; codes are [`CloseCode`].
//!
//! The machines here are sans-IO: they never touch sockets, files or clocks. Feed them with
//! `handle_frame` and `handle_io_done` (the receiver also `handle_timeout(now)`); drain
//! `poll_transmit`, `poll_io`, `poll_event` until each returns `None` after every input (and
//! ask the receiver's `poll_timeout` when to call `handle_timeout` next).

pub mod frame;
mod receiver;
mod sender;

use std::sync::Arc;

use bytes::Bytes;

pub use frame::{
    ChunkRange, Frame, FrameError, Hello, Message, Role, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use receiver::{Receiver, ReceiverConfig, RecvEvent, RecvIo, RecvIoDone, RoundVerdict};
pub use sender::{SendEvent, SendIo, SendIoDone, Sender, SenderConfig};

#[allow(unused_imports)]
use crate::manifest::Manifest;

/// Named reasons for ending a session, sent in `Close` frames (and usable as QUIC close codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
#[non_exhaustive]
pub enum CloseCode {
    /// The migration is complete.
    Done = 0,
    /// The user or application stopped; the migration can be resumed.
    Cancelled = 1,
    /// The peer broke the protocol (bad frame, unrequested chunk, out-of-range request).
    ProtocolViolation = 2,
    /// Magic number or protocol version not understood.
    UnsupportedVersion = 3,
    /// The receiver refused the manifest (unsafe path, limits, root mismatch).
    ManifestRejected = 4,
    /// A chunk failed verification repeatedly.
    IntegrityFailure = 5,
    /// The sender cannot read its source (file vanished, permission denied, changed during read).
    SourceError = 6,
    /// The receiver cannot write its destination (no space, permission, I/O error).
    DestinationError = 7,
    /// The peer stopped making progress.
    Timeout = 8,
}

impl CloseCode {
    pub fn from_u16(c: u16) -> Option<Self> {
        Some(match c {
            0 => CloseCode::Done,
            1 => CloseCode::Cancelled,
            2 => CloseCode::ProtocolViolation,
            3 => CloseCode::UnsupportedVersion,
            4 => CloseCode::ManifestRejected,
            5 => CloseCode::IntegrityFailure,
            6 => CloseCode::SourceError,
            7 => CloseCode::DestinationError,
            8 => CloseCode::Timeout,
            _ => return None,
        })
    }
}

/// Which stream a frame goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    Control,
    Data,
}

/// An encoded frame to send: `head` then `body` (a chunk payload is sent without copying).
#[derive(Clone, Debug)]
pub struct Transmit {
    pub lane: Lane,
    pub head: Bytes,
    pub body: Bytes,
}

impl Transmit {
    pub(crate) fn control(head: Bytes) -> Self {
        Transmit {
            lane: Lane::Control,
            head,
            body: Bytes::new(),
        }
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a session failed, as seen by one machine.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    #[error("the peer closed the session: {reason} ({code:?})")]
    PeerClosed {
        code: Option<CloseCode>,
        reason: String,
    },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("manifest rejected: {0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("integrity failure: {0}")]
    Integrity(String),
    #[error("source problem: {0}")]
    Source(String),
    /// The receiver's store failed: match the [`StoreError`](crate::store::StoreError) for its
    /// kind (no space, read-only, I/O error, …).
    #[error("destination problem: {0}")]
    Destination(Arc<crate::store::StoreError>),
}

impl SessionError {
    /// The close code that tells the peer about this error.
    pub fn close_code(&self) -> CloseCode {
        match self {
            SessionError::PeerClosed { .. } => CloseCode::Cancelled,
            SessionError::Protocol(_) => CloseCode::ProtocolViolation,
            SessionError::Frame(FrameError::UnsupportedVersion { .. } | FrameError::BadMagic) => {
                CloseCode::UnsupportedVersion
            }
            SessionError::Frame(_) => CloseCode::ProtocolViolation,
            SessionError::Manifest(crate::manifest::ManifestError::NoSpace { .. }) => {
                CloseCode::DestinationError
            }
            SessionError::Manifest(_) => CloseCode::ManifestRejected,
            SessionError::Integrity(_) => CloseCode::IntegrityFailure,
            SessionError::Source(_) => CloseCode::SourceError,
            SessionError::Destination(_) => CloseCode::DestinationError,
        }
    }

    /// Whether running the session again may succeed without anything changing.
    pub fn is_retryable(&self) -> bool {
        match self {
            SessionError::PeerClosed { code, .. } => {
                matches!(code, None | Some(CloseCode::Cancelled | CloseCode::Timeout))
            }
            _ => false,
        }
    }
}

pub(crate) fn close_frame(code: CloseCode, reason: &str) -> Transmit {
    let reason: String = reason.chars().take(1000).collect();
    let m = Message::Close {
        code: code as u16,
        reason,
    };
    // A close message is always small enough to encode.
    Transmit::control(frame::encode_message(&m).unwrap_or_default())
}
