//! The sender's protocol machine.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::frame::{self, ChunkRange, Frame, Hello, Message, Role, MANIFEST_FRAME_TARGET};
use super::{close_frame, CloseCode, Lane, SessionError, Transmit};
use crate::compress::Encoding;
use crate::manifest::{
    ChunkHash, ChunkId, EntryId, Manifest, ManifestBuilder, ManifestError, ManifestLimits,
    WireEntry,
};

/// Tuning for the sender.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// Chunk bytes read ahead of the network (issued reads plus frames not yet taken by
    /// `poll_transmit`). Bounds the sender's memory.
    pub read_ahead_bytes: u64,
    /// Most reads outstanding at once.
    pub max_reads: usize,
    /// Chunks a receiver may ask for beyond one copy of each (re-requests after corruption).
    pub max_rerequests: u64,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            read_ahead_bytes: 8 << 20,
            max_reads: 16,
            max_rerequests: 10_000,
        }
    }
}

/// I/O the sender asks its driver to perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendIo {
    /// Read `len` bytes of entry `entry` at `offset` and encode them (see
    /// [`crate::compress::encode_chunk`]). With `verify`, also check them against `hash` and
    /// answer [`SendIoDone::Changed`] on a mismatch.
    Read {
        chunk: ChunkId,
        entry: EntryId,
        offset: u64,
        len: u32,
        hash: ChunkHash,
        verify: bool,
        /// The file's manifest path (what [`crate::source::Source`] opens).
        path: String,
    },
}

/// Results of [`SendIo`].
#[derive(Clone, Debug)]
pub enum SendIoDone {
    Read {
        chunk: ChunkId,
        encoding: Encoding,
        payload: Bytes,
    },
    /// The source no longer holds the content the manifest promised.
    Changed {
        chunk: ChunkId,
    },
    Failed {
        chunk: ChunkId,
        error: String,
    },
}

/// What happened, for the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendEvent {
    /// The receiver's want list is complete. `reports_durable`: the receiver speaks version 3
    /// and will report what it holds ([`SendEvent::Durable`]); otherwise nothing is known of
    /// its progress until `Done`.
    Wanted {
        chunks: u64,
        bytes: u64,
        reports_durable: bool,
    },
    /// A chunk was handed out for sending: totals of this session so far, before
    /// (`raw_bytes`) and after (`wire_bytes`) compression. Handed out is not received: the
    /// transport's flow control keeps it at most its windows ahead of what the receiver read.
    Sent { raw_bytes: u64, wire_bytes: u64 },
    /// The receiver reported `bytes` of this round's file bytes verified and durable (version
    /// ≥ 3): clamped to the manifest's `bytes`, only ever growing.
    Durable { bytes: u64 },
    /// The receiver verified and committed everything. With a version ≥ 2 receiver the sender
    /// then awaits the application's verdict: [`Sender::finish`] or [`Sender::next_round`].
    Done { root: ChunkHash },
    /// A source file changed (or vanished) while its chunks were being read. The round ended
    /// cleanly (`NextRound` was sent; the receiver keeps what it verified): rescan and serve
    /// the next round.
    SourceChanged { path: String },
    /// The session ended with an error (already sent to the peer when it was ours).
    Failed(SessionError),
}

#[derive(Debug)]
enum State {
    AwaitHello,
    Serving(Serving),
    /// The receiver finished the round; waiting for `finish` or `next_round`.
    AwaitVerdict,
    Closed,
}

/// What only a serving sender tracks.
#[derive(Debug, Default)]
struct Serving {
    /// The next manifest entry to send.
    manifest_next: usize,
    /// `ManifestEnd` was sent.
    manifest_done: bool,
    /// Chunk ranges the receiver wants and that were not read yet, in its order.
    want: VecDeque<ChunkRange>,
    /// Chunks the receiver rejected: their next read is checked against the manifest.
    verify: HashSet<ChunkId>,
    /// Chunks asked for so far (at most the manifest's plus `max_rerequests`).
    requested: u64,
}

/// The sender's manifest: complete, or still growing as the application scans (version 4).
#[derive(Debug)]
enum Entries {
    Building(Box<ManifestBuilder>),
    Complete(Arc<Manifest>),
}

impl Entries {
    /// The manifest, or the prefix of it announced so far.
    fn get(&self) -> &Manifest {
        match self {
            Entries::Building(b) => b.prefix(),
            Entries::Complete(m) => m,
        }
    }

    fn complete(&self) -> Option<&Arc<Manifest>> {
        match self {
            Entries::Building(_) => None,
            Entries::Complete(m) => Some(m),
        }
    }
}

/// The sender's side of one session. See the [module docs](super) for the protocol.
#[derive(Debug)]
pub struct Sender {
    manifest: Entries,
    cfg: SenderConfig,
    state: State,
    /// The receiver's protocol version (from its hello).
    peer_version: u16,
    control: VecDeque<Transmit>,
    data: VecDeque<(u32, Transmit)>,
    events: VecDeque<SendEvent>,
    reads: usize,
    ahead_bytes: u64,
    wire_bytes: u64,
    chunks_sent: u64,
    raw_bytes_sent: u64,
    /// The highest durable figure the receiver reported (clamped to the manifest's bytes).
    durable_bytes: u64,
}

impl Sender {
    /// A new session for `manifest`. Queues the hello.
    pub fn new(manifest: Arc<Manifest>, cfg: SenderConfig) -> Self {
        Self::with_entries(Entries::Complete(manifest), cfg)
    }

    /// A new session whose manifest the application supplies while it scans: entries in path
    /// order with [`push_entries`](Self::push_entries), then [`end_manifest`](Self::end_manifest).
    /// Entries are announced as they come, and chunks the receiver asks for are served at once
    /// (see the [module docs](super), "Streaming"). Queues the hello.
    pub fn streaming(cfg: SenderConfig) -> Self {
        let limits = ManifestLimits {
            max_memory: u64::MAX,
            ..ManifestLimits::default()
        };
        Self::with_entries(
            Entries::Building(Box::new(ManifestBuilder::new(limits))),
            cfg,
        )
    }

    fn with_entries(manifest: Entries, cfg: SenderConfig) -> Self {
        let mut control = VecDeque::new();
        control.push_back(Transmit::control(frame::encode_hello(&Hello {
            version: frame::PROTOCOL_VERSION,
            role: Role::Sender,
        })));
        Sender {
            manifest,
            cfg,
            state: State::AwaitHello,
            peer_version: 0,
            control,
            data: VecDeque::new(),
            events: VecDeque::new(),
            reads: 0,
            ahead_bytes: 0,
            wire_bytes: 0,
            chunks_sent: 0,
            raw_bytes_sent: 0,
            durable_bytes: 0,
        }
    }

    /// The complete manifest (`None` while a streaming sender's scan goes on).
    pub fn manifest(&self) -> Option<&Arc<Manifest>> {
        self.manifest.complete()
    }

    /// The manifest announced so far (all of it once complete).
    pub fn manifest_prefix(&self) -> &Manifest {
        self.manifest.get()
    }

    /// Adds the next entries of a streaming sender's manifest (in path order, after those
    /// pushed before). An entry the manifest refuses (out of order, …) fails the session.
    pub fn push_entries(&mut self, entries: Vec<WireEntry>) -> Result<(), ManifestError> {
        let Entries::Building(b) = &mut self.manifest else {
            return Ok(());
        };
        for e in entries {
            if let Err(err) = b.push(e) {
                if !self.is_closed() {
                    self.fail(SessionError::Source(format!("manifest: {err}")));
                }
                return Err(err);
            }
        }
        Ok(())
    }

    /// Ends a streaming sender's manifest: the root is computed and `ManifestEnd` follows the
    /// last entry. Nothing happens for a complete manifest.
    pub fn end_manifest(&mut self) {
        if let Entries::Building(b) = &mut self.manifest {
            let b = std::mem::replace(b, Box::new(ManifestBuilder::new(ManifestLimits::default())));
            self.manifest = Entries::Complete(Arc::new(b.finish_unchecked()));
        }
    }

    /// Whether the manifest is complete (always, unless streaming and not yet ended).
    pub fn manifest_complete(&self) -> bool {
        self.manifest.complete().is_some()
    }

    /// Chunk payload bytes handed out for sending (after compression).
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes
    }

    /// Chunk bytes handed out for sending (before compression).
    pub fn raw_bytes_sent(&self) -> u64 {
        self.raw_bytes_sent
    }

    pub fn chunks_sent(&self) -> u64 {
        self.chunks_sent
    }

    /// Whether the session is over (done or failed).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Whether the receiver finished this round and the application must decide:
    /// [`finish`](Self::finish) or [`next_round`](Self::next_round).
    pub fn is_awaiting_verdict(&self) -> bool {
        matches!(self.state, State::AwaitVerdict)
    }

    /// Whether the receiver speaks catch-up rounds (protocol version 2 or later).
    pub fn peer_supports_rounds(&self) -> bool {
        self.peer_version >= 2
    }

    /// Whether the receiver reports what it holds during a round (protocol version 3 or later).
    pub fn peer_reports_durable(&self) -> bool {
        self.peer_version >= 3
    }

    /// The round's file bytes the receiver reported verified and durable (see
    /// [`SendEvent::Durable`]).
    pub fn durable_bytes(&self) -> u64 {
        self.durable_bytes
    }

    /// Ends the migration after a finished round: the receiver's copy is final.
    pub fn finish(&mut self) {
        if matches!(self.state, State::AwaitVerdict) {
            self.control
                .push_back(close_frame(CloseCode::Done, "migration complete"));
            self.state = State::Closed;
        }
    }

    /// Announces another round after a finished one (the source changed meanwhile). The
    /// session ends; the next round runs on a new control stream the receiver opens.
    pub fn next_round(&mut self) {
        if matches!(self.state, State::AwaitVerdict) {
            self.push_next_round();
            self.state = State::Closed;
        }
    }

    fn push_next_round(&mut self) {
        self.control.push_back(Transmit::control(
            frame::encode_message(&Message::NextRound).unwrap_or_default(),
        ));
    }

    /// Reads outstanding.
    pub fn reads_in_flight(&self) -> usize {
        self.reads
    }

    /// Feeds a frame received from the receiver.
    pub fn handle_frame(&mut self, frame: Frame) {
        if matches!(self.state, State::Closed) {
            return;
        }
        if let Err(e) = self.on_frame(frame) {
            self.fail(e);
        }
    }

    /// Feeds a frame decoding error (the stream is unusable).
    pub fn handle_frame_error(&mut self, e: frame::FrameError) {
        if !matches!(self.state, State::Closed) {
            self.fail(e.into());
        }
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), SessionError> {
        match (&mut self.state, frame) {
            (State::AwaitHello, Frame::Hello(h)) => {
                if h.role != Role::Receiver {
                    return Err(SessionError::Protocol("peer is not a receiver".into()));
                }
                self.peer_version = h.version;
                self.state = State::Serving(Serving::default());
                Ok(())
            }
            (_, Frame::Message(Message::Close { code, reason })) => {
                let code = CloseCode::from_u16(code);
                self.state = State::Closed;
                self.events
                    .push_back(SendEvent::Failed(SessionError::PeerClosed { code, reason }));
                Ok(())
            }
            (State::Serving(s), Frame::Message(Message::Want(ranges))) => {
                let n = self.manifest.get().unique_chunks().len() as u64;
                for r in ranges {
                    if r.start >= r.end || u64::from(r.end.0) > n {
                        return Err(SessionError::Protocol(format!(
                            "want range {}..{} outside the {n} chunks announced",
                            r.start, r.end
                        )));
                    }
                    s.requested += u64::from(r.end.0 - r.start.0);
                    if s.requested > n + self.cfg.max_rerequests {
                        return Err(SessionError::Protocol(format!(
                            "receiver asked for {} chunks; {n} were announced",
                            s.requested
                        )));
                    }
                    s.want.push_back(r);
                }
                Ok(())
            }
            (State::Serving(_), Frame::Message(Message::WantEnd { chunks, bytes })) => {
                self.events.push_back(SendEvent::Wanted {
                    chunks,
                    bytes,
                    reports_durable: self.peer_reports_durable(),
                });
                Ok(())
            }
            (State::Serving(_), Frame::Message(Message::Durable { bytes })) => {
                if !self.peer_reports_durable() {
                    return Err(SessionError::Protocol(format!(
                        "durable report from a version-{} receiver",
                        self.peer_version
                    )));
                }
                // A claim from the peer: never more than the round holds, never backwards.
                let bytes = bytes.min(self.manifest.get().summary().bytes);
                if bytes > self.durable_bytes {
                    self.durable_bytes = bytes;
                    self.events.push_back(SendEvent::Durable { bytes });
                }
                Ok(())
            }
            (State::Serving(s), Frame::Message(Message::Rejected { chunk })) => {
                if chunk.index() >= self.manifest.get().unique_chunks().len() {
                    return Err(SessionError::Protocol(format!(
                        "rejected unknown chunk {chunk}"
                    )));
                }
                if s.verify.len() as u64 > self.cfg.max_rerequests {
                    return Err(SessionError::Protocol("too many rejected chunks".into()));
                }
                s.verify.insert(chunk);
                Ok(())
            }
            (State::Serving(_), Frame::Message(Message::Done { root })) => {
                let Some(m) = self.manifest.complete() else {
                    return Err(SessionError::Protocol(
                        "receiver finished before the manifest was complete".into(),
                    ));
                };
                if root != m.root() {
                    return Err(SessionError::Protocol(format!(
                        "receiver finished root {root:?}, expected {:?}",
                        m.root()
                    )));
                }
                self.events.push_back(SendEvent::Done { root });
                if self.peer_supports_rounds() {
                    self.state = State::AwaitVerdict;
                } else {
                    // A version-1 receiver knows no rounds: its copy is final.
                    self.control
                        .push_back(close_frame(CloseCode::Done, "migration complete"));
                    self.state = State::Closed;
                }
                Ok(())
            }
            (_, f) => Err(SessionError::Protocol(format!(
                "unexpected frame {}",
                f.name()
            ))),
        }
    }

    /// Feeds the result of a [`SendIo`].
    pub fn handle_io_done(&mut self, done: SendIoDone) {
        match done {
            SendIoDone::Read {
                chunk,
                encoding,
                payload,
            } => {
                self.reads = self.reads.saturating_sub(1);
                let Some(u) = self.manifest.get().unique(chunk) else {
                    return;
                };
                let raw_len = u.len;
                if matches!(self.state, State::Closed) {
                    self.ahead_bytes = self.ahead_bytes.saturating_sub(u64::from(raw_len));
                    return;
                }
                let head = frame::encode_chunk_header(chunk, encoding, raw_len, payload.len());
                self.data.push_back((
                    raw_len,
                    Transmit {
                        lane: Lane::Data,
                        head,
                        body: payload,
                    },
                ));
            }
            SendIoDone::Changed { chunk } | SendIoDone::Failed { chunk, .. } => {
                self.reads = self.reads.saturating_sub(1);
                let path = self
                    .manifest
                    .get()
                    .unique(chunk)
                    .and_then(|u| self.manifest.get().locate(u.first_slot))
                    .and_then(|l| self.manifest.get().entry(l.entry))
                    .map_or_else(|| format!("chunk {chunk}"), |e| e.path.clone());
                if !matches!(self.state, State::Serving(_)) {
                    return;
                }
                match done {
                    SendIoDone::Changed { .. } if self.peer_supports_rounds() => {
                        // End the round cleanly; the application rescans and serves the next.
                        self.push_next_round();
                        self.events.push_back(SendEvent::SourceChanged { path });
                        self.state = State::Closed;
                        self.data.clear();
                    }
                    SendIoDone::Failed { error, .. } => {
                        self.fail(SessionError::Source(format!("cannot read {path}: {error}")));
                    }
                    _ => self.fail(SessionError::Source(format!(
                        "{path} changed while it was being sent; run ferry send again to rescan"
                    ))),
                }
            }
        }
    }

    /// Ends the session with `e` (sent to the receiver as a close).
    pub fn abort(&mut self, e: SessionError) {
        if !self.is_closed() {
            self.fail(e);
        }
    }

    fn fail(&mut self, e: SessionError) {
        self.control
            .push_back(close_frame(e.close_code(), &e.to_string()));
        self.events.push_back(SendEvent::Failed(e));
        self.state = State::Closed;
        self.data.clear();
    }

    /// The next frame to send. Control frames go first; data frames are chunks.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if let Some(t) = self.control.pop_front() {
            return Some(t);
        }
        if let State::Serving(s) = &mut self.state {
            if !s.manifest_done {
                if let Some(msg) = s.next_manifest_message(&self.manifest) {
                    return Some(match frame::encode_message(&msg) {
                        Ok(b) => Transmit::control(b),
                        Err(e) => self.manifest_unencodable(e),
                    });
                }
            }
        }
        let (raw_len, t) = self.data.pop_front()?;
        self.ahead_bytes = self.ahead_bytes.saturating_sub(u64::from(raw_len));
        self.wire_bytes += t.body.len() as u64;
        self.raw_bytes_sent += u64::from(raw_len);
        self.chunks_sent += 1;
        self.events.push_back(SendEvent::Sent {
            raw_bytes: self.raw_bytes_sent,
            wire_bytes: self.wire_bytes,
        });
        Some(t)
    }

    /// Whether a data frame is ready (so a driver with a busy data path can skip polling).
    pub fn has_data(&self) -> bool {
        !self.data.is_empty()
    }

    /// Whether a control frame is ready.
    pub fn has_control(&self) -> bool {
        !self.control.is_empty()
            || matches!(&self.state, State::Serving(s) if !s.manifest_done
                && (s.manifest_next < self.manifest.get().entries().len()
                    || self.manifest.complete().is_some()))
    }

    /// The manifest could not be encoded: the session fails; returns the close frame.
    fn manifest_unencodable(&mut self, e: frame::FrameError) -> Transmit {
        let err = SessionError::Source(format!("manifest cannot be encoded: {e}"));
        let t = close_frame(err.close_code(), &err.to_string());
        self.events.push_back(SendEvent::Failed(err));
        self.state = State::Closed;
        t
    }

    /// The next read to perform.
    #[must_use]
    pub fn poll_io(&mut self) -> Option<SendIo> {
        let State::Serving(s) = &mut self.state else {
            return None;
        };
        if self.reads >= self.cfg.max_reads || self.ahead_bytes >= self.cfg.read_ahead_bytes {
            return None;
        }
        let r = s.want.front_mut()?;
        let chunk = r.start;
        r.start = r.start.next();
        if r.start >= r.end {
            s.want.pop_front();
        }
        let m = self.manifest.get();
        let u = *m.unique(chunk)?;
        let loc = m.locate(u.first_slot)?;
        let path = m.entry(loc.entry)?.path.clone();
        self.reads += 1;
        self.ahead_bytes += u64::from(u.len);
        Some(SendIo::Read {
            chunk,
            entry: loc.entry,
            offset: loc.offset,
            len: u.len,
            hash: u.hash,
            verify: s.verify.remove(&chunk),
            path,
        })
    }

    /// The next event for the application.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SendEvent> {
        self.events.pop_front()
    }
}

impl Serving {
    /// The next manifest frame's message: entries up to about [`MANIFEST_FRAME_TARGET`] bytes,
    /// or `ManifestEnd` once they are all sent and the manifest is complete; `None` while a
    /// streaming manifest has nothing new.
    fn next_manifest_message(&mut self, all: &Entries) -> Option<Message> {
        let m = all.get();
        let mut entries = Vec::new();
        let mut size = 0usize;
        while size < MANIFEST_FRAME_TARGET {
            let Some(e) = m.wire_entry(self.manifest_next) else {
                break;
            };
            size += e.path.len() + 32 * e.hashes.len() + 48;
            entries.push(e);
            self.manifest_next += 1;
        }
        if !entries.is_empty() {
            return Some(Message::Manifest(entries));
        }
        let m = all.complete()?;
        self.manifest_done = true;
        Some(Message::ManifestEnd(*m.summary()))
    }
}
