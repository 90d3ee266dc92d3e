//! The receiver's protocol machine.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::frame::{self, ChunkRange, Frame, Hello, Message, Role, MAX_RANGES_PER_FRAME};
use super::{close_frame, CloseCode, SessionError, Transmit};
use crate::compress::Encoding;
use crate::manifest::{ChunkId, ManifestBuilder, ManifestLimits, ManifestSummary, SlotId};
use crate::store::StoreError;
use crate::Manifest;

/// Least time between two `Durable` reports to the sender (the round's last commit is always
/// reported at once).
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// While nothing is wanted, a streaming receiver waits this many stall timeouts for the
/// sender's next entries (it may be hashing one large file) before it ends the session.
const STREAM_SILENCE_FACTOR: u32 = 10;

/// Tuning for the receiver.
#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    pub limits: ManifestLimits,
    /// Commit (fsync + journal) once this many verified bytes wait.
    pub commit_bytes: u64,
    /// …or once this many slots wait (many tiny files: each is a staging file to sync, and
    /// journal records to write, however few bytes they hold).
    pub commit_slots: usize,
    /// …or once the oldest uncommitted chunk waited this long.
    pub commit_interval: Duration,
    /// Chunk bytes being verified/written or waiting for commit before the receiver stops
    /// reading the network (see [`Receiver::can_accept_chunk`]).
    pub max_pending_bytes: u64,
    /// A chunk failing verification this many times ends the session.
    pub max_rejects_per_chunk: u32,
    /// With chunks wanted, no chunk for this long ends the session (so the driver reconnects).
    /// The same limit applies to the hello and the manifest: a sender that goes silent before
    /// the manifest is complete cannot hold the receiver forever.
    pub stall_timeout: Duration,
    /// The destination can hold symlinks ([`crate::store::FsStore::holds_symlinks`]). When it
    /// cannot, the manifest's symlinks are named ([`RecvEvent::Unrepresentable`]) before
    /// anything is written, and the store leaves them out.
    pub symlinks: bool,
    /// The store holds nothing of any history (no journal, staging or receipt: a fresh
    /// destination). With a version-4 sender the receiver then asks for chunks as the manifest
    /// streams in, preparing the store for each prefix of it (see the [module docs](super),
    /// "Streaming"); otherwise it waits for the whole manifest.
    pub stream: bool,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            limits: ManifestLimits::default(),
            commit_bytes: 16 << 20,
            commit_slots: 4096,
            commit_interval: Duration::from_millis(500),
            max_pending_bytes: 64 << 20,
            max_rejects_per_chunk: 3,
            stall_timeout: Duration::from_secs(60),
            symlinks: true,
            stream: false,
        }
    }
}

/// I/O the receiver asks its driver (and store) to perform.
#[derive(Clone, Debug)]
pub enum RecvIo {
    /// Open the store for this manifest: reload the journal, find reusable data, and answer
    /// [`RecvIoDone::Prepared`] with every slot that is already durable.
    Prepare { manifest: Arc<Manifest> },
    /// Verify a received chunk (decode within its declared length, check its hash) and write it
    /// to `slots`. Answer `Stored` or `Corrupt`. Nothing is durable yet.
    Store {
        chunk: ChunkId,
        encoding: Encoding,
        payload: Bytes,
        slots: Vec<SlotId>,
    },
    /// Read durable slot `from`, verify it, write it to `to`. Answer `Stored`, or `CopyFailed`
    /// when the source no longer holds the chunk (it is then fetched from the sender).
    Copy {
        chunk: ChunkId,
        from: SlotId,
        to: Vec<SlotId>,
    },
    /// Make `slots` durable: fsync their data, then append them to the journal and fsync it.
    Commit { slots: Vec<SlotId> },
    /// Every slot is durable: verify each file from disk, move it into place, write the receipt.
    /// Answer `Finalized`, or `Damaged` with slots that failed verification.
    Finalize,
}

/// Results of [`RecvIo`].
#[derive(Clone, Debug)]
pub enum RecvIoDone {
    Prepared {
        durable: Vec<SlotId>,
    },
    Stored {
        chunk: ChunkId,
        slots: Vec<SlotId>,
    },
    Corrupt {
        chunk: ChunkId,
        error: String,
    },
    Committed {
        slots: Vec<SlotId>,
    },
    /// Finalize found these durable slots not holding their chunk (disk damage); fetch them again.
    Damaged {
        slots: Vec<SlotId>,
    },
    /// A local copy's durable source no longer holds the chunk; `damaged` slots (the source, or
    /// a whole file that was trusted in place) are fetched again.
    CopyFailed {
        chunk: ChunkId,
        damaged: Vec<SlotId>,
    },
    Finalized,
    /// The store failed; the session ends with a destination error carrying it.
    Failed {
        error: Arc<StoreError>,
    },
}

/// What happened, for the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecvEvent {
    /// The manifest arrived and was validated.
    Manifest(ManifestSummary),
    /// Entries of the manifest that the destination cannot hold (`paths`, its symlinks when
    /// [`ReceiverConfig::symlinks`] is false): named before anything is written; the rest is
    /// migrated and verified, these are left out.
    Unrepresentable {
        paths: Vec<String>,
        reason: &'static str,
    },
    /// Part of the history was already here (earlier run, or local copies).
    Resumed {
        bytes_have: u64,
        bytes_total: u64,
    },
    /// Want list sent: this much must cross the network.
    Wanted {
        chunks: u64,
        bytes: u64,
    },
    /// Verified and durable bytes so far (of `bytes_total` file bytes); `wire_bytes` counts
    /// chunk payload received in this session (after compression); `files_done` counts the
    /// manifest's files whose every chunk is durable here (empty files count from the start).
    /// Sent once the manifest is complete (a streaming session's first one covers what arrived
    /// before).
    Progress {
        bytes_done: u64,
        bytes_total: u64,
        wire_bytes: u64,
        files_done: u64,
    },
    /// Everything is verified, committed and in place.
    Done(ManifestSummary),
    /// The sender ended this round early (a source file changed under its read): what was
    /// verified is committed and kept; the next round reuses it.
    Restarted,
    Failed(SessionError),
}

#[derive(Debug)]
enum State {
    /// `last_frame_at`: when the last frame arrived (the stall clock until the manifest is in).
    AwaitHello {
        last_frame_at: Option<Instant>,
    },
    Manifest {
        builder: Box<ManifestBuilder>,
        last_frame_at: Option<Instant>,
    },
    Preparing,
    /// Version 4, fresh store: chunks are asked for while the manifest streams in. `builder`
    /// is `None` once `ManifestEnd` arrived (the full manifest waits in [`Stream::full`]).
    Streaming {
        builder: Option<Box<ManifestBuilder>>,
        last_frame_at: Option<Instant>,
        transfer: Transfer,
    },
    Transferring(Transfer),
    /// The transfer's bookkeeping is kept: damage found by finalize resumes the transfer.
    Finalizing(Transfer),
    Done,
    /// Link lost or failed: finish outstanding I/O, commit, stop.
    Draining,
}

/// What only the transfer (and a finalize that may resume it) tracks.
#[derive(Debug, Default)]
struct Transfer {
    /// Local copies still to issue: (chunk, durable source slot, slots to write).
    copies: VecDeque<(ChunkId, SlotId, Vec<SlotId>)>,
    /// Verification failures per chunk.
    rejects: HashMap<ChunkId, u32>,
    /// When the last chunk arrived (the stall clock while chunks are wanted).
    last_chunk_at: Option<Instant>,
}

/// A set of ids (chunks or slots), one bit each.
#[derive(Debug, Clone)]
struct BitSet<I>(Vec<u64>, std::marker::PhantomData<I>);

impl<I> Default for BitSet<I> {
    fn default() -> Self {
        BitSet(Vec::new(), std::marker::PhantomData)
    }
}

/// An id a [`BitSet`] holds.
trait BitIndex: Copy {
    fn bit(self) -> usize;
}

impl BitIndex for ChunkId {
    fn bit(self) -> usize {
        self.index()
    }
}

impl BitIndex for SlotId {
    fn bit(self) -> usize {
        self.index()
    }
}

impl<I: BitIndex> BitSet<I> {
    fn new(n: usize) -> Self {
        BitSet(vec![0; n.div_ceil(64)], std::marker::PhantomData)
    }
    fn get(&self, i: I) -> bool {
        let i = i.bit();
        self.0.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
    }
    /// Room for `n` ids, keeping the ones set.
    fn grow(&mut self, n: usize) {
        let words = n.div_ceil(64);
        if words > self.0.len() {
            self.0.resize(words, 0);
        }
    }
    fn set(&mut self, i: I, v: bool) {
        let i = i.bit();
        if let Some(w) = self.0.get_mut(i / 64) {
            if v {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        }
    }
}

/// The receiver's side of one session. See the [module docs](super) for the protocol.
#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    state: State,
    manifest: Option<Arc<Manifest>>,
    /// Unique chunks verified and written (maybe not yet durable).
    have: BitSet<ChunkId>,
    /// Unique chunks asked of the sender and not yet arrived.
    wanted: BitSet<ChunkId>,
    durable: BitSet<SlotId>,
    slots_durable: u64,
    /// Per manifest entry: its slots not yet durable (set once the store is prepared).
    file_missing: Vec<u32>,
    /// Files whose every slot is durable.
    files_done: u64,
    control: VecDeque<Transmit>,
    io: VecDeque<RecvIo>,
    events: VecDeque<RecvEvent>,
    /// I/O issued (store, copy) and not answered, in bytes and count.
    busy_bytes: u64,
    busy: usize,
    uncommitted: Vec<SlotId>,
    uncommitted_bytes: u64,
    uncommitted_since: Option<Instant>,
    committing: bool,
    bytes_done: u64,
    now: Option<Instant>,
    wanted_left: u64,
    wire_bytes: u64,
    /// Prepare or Finalize outstanding (they must finish before the store is used again).
    exclusive_io: bool,
    /// File bytes verified and written (durable or not) — what progress shows.
    bytes_verified: u64,
    /// What the sender said about the end of this round, if anything yet.
    verdict: Option<RoundVerdict>,
    /// The sender's protocol version (from its hello; 0 before it).
    peer_version: u16,
    /// Durable bytes last reported to the sender, and when (the machine's clock).
    reported: u64,
    reported_at: Option<Instant>,
    /// A report is due once [`REPORT_EVERY`] has passed since the last one.
    report_pending: bool,
    /// Streaming (version 4): the prefixes the store was prepared for.
    stream: Stream,
}

/// What a streaming receiver tracks about the manifest prefixes it asked chunks of.
#[derive(Debug, Default)]
struct Stream {
    /// Entries of the prefix the store was last prepared with (0: none yet).
    prepared_entries: usize,
    /// A larger prefix is due: no chunk is taken until stores and commits settle and the
    /// store is prepared for it.
    grow_due: bool,
    /// The complete, root-checked manifest once `ManifestEnd` arrived.
    full: Option<Arc<Manifest>>,
    /// Chunks (and their bytes) asked for over the session, for `WantEnd`.
    wanted_chunks: u64,
    wanted_bytes: u64,
}

/// How the sender ended a round (see [`Receiver::verdict`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundVerdict {
    /// After our `Done`, the sender closed with `Done`: this round's tree is the migration's.
    Final,
    /// Another round follows on a new control stream (after our `Done`, or cutting this round
    /// short).
    NextRound,
}

impl Receiver {
    /// A new session. Queues the hello.
    pub fn new(cfg: ReceiverConfig) -> Self {
        let mut control = VecDeque::new();
        control.push_back(Transmit::control(frame::encode_hello(&Hello {
            version: frame::PROTOCOL_VERSION,
            role: Role::Receiver,
        })));
        Receiver {
            cfg,
            state: State::AwaitHello {
                last_frame_at: None,
            },
            manifest: None,
            have: BitSet::default(),
            wanted: BitSet::default(),
            durable: BitSet::default(),
            slots_durable: 0,
            file_missing: Vec::new(),
            files_done: 0,
            control,
            io: VecDeque::new(),
            events: VecDeque::new(),
            busy_bytes: 0,
            busy: 0,
            uncommitted: Vec::new(),
            uncommitted_bytes: 0,
            uncommitted_since: None,
            committing: false,
            bytes_done: 0,
            now: None,
            wanted_left: 0,
            wire_bytes: 0,
            exclusive_io: false,
            bytes_verified: 0,
            verdict: None,
            peer_version: 0,
            reported: 0,
            reported_at: None,
            report_pending: false,
            stream: Stream::default(),
        }
    }

    /// The sender's verdict on this round: `Final` or `NextRound`; `None` until it arrives.
    pub fn verdict(&self) -> Option<RoundVerdict> {
        self.verdict
    }

    /// The validated manifest, once it has arrived.
    pub fn manifest(&self) -> Option<&Arc<Manifest>> {
        self.manifest.as_ref()
    }

    /// Bytes of memory the manifest being received holds (see
    /// [`ManifestBuilder::held_bytes`]); `None` outside the manifest phase.
    pub fn manifest_held_bytes(&self) -> Option<u64> {
        match &self.state {
            State::Manifest { builder, .. }
            | State::Streaming {
                builder: Some(builder),
                ..
            } => Some(builder.held_bytes()),
            _ => None,
        }
    }

    /// Whether the migration completed.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Whether the session is over and all I/O has settled (the store may be closed).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Done | State::Draining)
            && self.busy == 0
            && !self.committing
            && !self.exclusive_io
            && self.io.is_empty()
            && self.uncommitted.is_empty()
    }

    /// Chunk payload bytes received in this session (after compression).
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes
    }

    /// Verified, durable file bytes.
    pub fn bytes_done(&self) -> u64 {
        self.bytes_done
    }

    /// Whether the driver should read another chunk frame now (bounded memory).
    pub fn can_accept_chunk(&self) -> bool {
        let streaming = matches!(self.state, State::Streaming { .. });
        self.busy_bytes + self.uncommitted_bytes < self.cfg.max_pending_bytes
            && !(streaming && (self.stream.grow_due || self.exclusive_io))
    }

    /// Feeds a frame received from the sender.
    pub fn handle_frame(&mut self, frame: Frame) {
        if matches!(self.state, State::Done | State::Draining) {
            // After our Done (or a restart) only the sender's verdict matters.
            if self.verdict.is_none() {
                match frame {
                    Frame::Message(Message::Close { code, .. })
                        if matches!(self.state, State::Done)
                            && CloseCode::from_u16(code) == Some(CloseCode::Done) =>
                    {
                        self.verdict = Some(RoundVerdict::Final);
                    }
                    Frame::Message(Message::NextRound) => {
                        self.verdict = Some(RoundVerdict::NextRound);
                    }
                    _ => {}
                }
            }
            return;
        }
        if let (
            Some(now),
            State::AwaitHello { last_frame_at }
            | State::Manifest { last_frame_at, .. }
            | State::Streaming { last_frame_at, .. },
        ) = (self.now, &mut self.state)
        {
            *last_frame_at = Some(now);
        }
        if let Err(e) = self.on_frame(frame) {
            self.fail(e);
        }
    }

    /// Feeds a frame decoding error (the stream is unusable).
    pub fn handle_frame_error(&mut self, e: frame::FrameError) {
        if !matches!(self.state, State::Done | State::Draining) {
            self.fail(e.into());
        }
    }

    /// The transport saw the sender break the protocol (e.g. too many data streams).
    pub fn handle_protocol_violation(&mut self, why: impl Into<String>) {
        if !matches!(self.state, State::Done | State::Draining) {
            self.fail(SessionError::Protocol(why.into()));
        }
    }

    /// The connection is gone: stop asking for data, finish and commit what arrived.
    pub fn handle_link_lost(&mut self) {
        if !matches!(self.state, State::Done | State::Draining) {
            self.state = State::Draining;
            self.flush_commit();
        }
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), SessionError> {
        if let Frame::Message(Message::Close { code, reason }) = frame {
            let code = CloseCode::from_u16(code);
            self.events
                .push_back(RecvEvent::Failed(SessionError::PeerClosed { code, reason }));
            self.state = State::Draining;
            self.flush_commit();
            return Ok(());
        }
        if let Frame::Message(Message::NextRound) = frame {
            if matches!(self.state, State::AwaitHello { .. }) {
                return Err(SessionError::Protocol("next-round before hello".into()));
            }
            self.verdict = Some(RoundVerdict::NextRound);
            if !matches!(self.state, State::Finalizing(_)) {
                // Keep every verified chunk (commit it), ask for nothing more. A finalize
                // already running completes: its tree is verified either way.
                self.events.push_back(RecvEvent::Restarted);
                self.state = State::Draining;
                self.flush_commit();
            }
            return Ok(());
        }
        match (&mut self.state, frame) {
            (State::AwaitHello { last_frame_at }, Frame::Hello(h)) => {
                if h.role != Role::Sender {
                    return Err(SessionError::Protocol("peer is not a sender".into()));
                }
                self.peer_version = h.version;
                let builder = Box::new(ManifestBuilder::new(self.cfg.limits.clone()));
                let last_frame_at = *last_frame_at;
                self.state = if self.cfg.stream && h.version >= 4 {
                    State::Streaming {
                        builder: Some(builder),
                        last_frame_at,
                        transfer: Transfer::default(),
                    }
                } else {
                    State::Manifest {
                        builder,
                        last_frame_at,
                    }
                };
                Ok(())
            }
            (
                State::Streaming {
                    builder: Some(builder),
                    ..
                },
                Frame::Message(Message::Manifest(entries)),
            ) => {
                for e in entries {
                    builder.push(e)?;
                }
                self.maybe_grow();
                Ok(())
            }
            (
                State::Streaming {
                    builder: builder @ Some(_),
                    ..
                },
                Frame::Message(Message::ManifestEnd(summary)),
            ) => {
                let Some(b) = builder.take() else {
                    return Err(SessionError::Protocol("internal state".into()));
                };
                // The root is checked before anything more is asked or finalized.
                let m = Arc::new(b.finish(&summary)?);
                self.manifest_complete(&m, summary);
                self.stream.full = Some(m);
                self.maybe_grow();
                Ok(())
            }
            (State::Manifest { builder, .. }, Frame::Message(Message::Manifest(entries))) => {
                for e in entries {
                    builder.push(e)?;
                }
                Ok(())
            }
            (State::Manifest { .. }, Frame::Message(Message::ManifestEnd(summary))) => {
                let State::Manifest { builder: b, .. } =
                    std::mem::replace(&mut self.state, State::Preparing)
                else {
                    return Err(SessionError::Protocol("internal state".into()));
                };
                let m = Arc::new(b.finish(&summary)?);
                self.grow_tables(&m);
                self.manifest_complete(&m, summary);
                self.io.push_back(RecvIo::Prepare {
                    manifest: Arc::clone(&m),
                });
                self.exclusive_io = true;
                self.manifest = Some(m);
                Ok(())
            }
            (
                State::Transferring(_) | State::Streaming { .. },
                Frame::Chunk {
                    id,
                    encoding,
                    raw_len,
                    payload,
                },
            ) => self.on_chunk(id, encoding, raw_len, payload),
            (_, f) => Err(SessionError::Protocol(format!(
                "unexpected {} frame",
                f.name()
            ))),
        }
    }

    fn on_chunk(
        &mut self,
        id: ChunkId,
        encoding: Encoding,
        raw_len: u32,
        payload: Bytes,
    ) -> Result<(), SessionError> {
        let m = self
            .manifest
            .as_ref()
            .ok_or_else(|| SessionError::Protocol("no manifest".into()))?;
        let u = *m
            .unique(id)
            .ok_or_else(|| SessionError::Protocol(format!("chunk {id} is not in the manifest")))?;
        if !self.wanted.get(id) {
            return Err(SessionError::Protocol(format!(
                "chunk {id} was never requested"
            )));
        }
        if raw_len != u.len {
            return Err(SessionError::Protocol(format!(
                "chunk {id} declared {raw_len} bytes, the manifest says {}",
                u.len
            )));
        }
        let max_payload = u.len as usize + u.len as usize / 128 + 1024;
        if payload.len() > max_payload {
            return Err(SessionError::Protocol(format!(
                "chunk {id} payload is oversized"
            )));
        }
        self.wanted.set(id, false);
        self.wanted_left = self.wanted_left.saturating_sub(1);
        self.wire_bytes += payload.len() as u64;
        if let State::Transferring(t) | State::Streaming { transfer: t, .. } = &mut self.state {
            t.last_chunk_at = self.now;
        }
        let slots: Vec<SlotId> = m.slots_of(id).filter(|&s| !self.durable.get(s)).collect();
        self.busy += 1;
        self.busy_bytes += u64::from(u.len);
        self.io.push_back(RecvIo::Store {
            chunk: id,
            encoding,
            payload,
            slots,
        });
        Ok(())
    }

    /// Feeds the result of a [`RecvIo`].
    pub fn handle_io_done(&mut self, done: RecvIoDone) {
        let Some(m) = self.manifest.clone() else {
            return;
        };
        match done {
            RecvIoDone::Prepared { durable } => {
                self.exclusive_io = false;
                if matches!(self.state, State::Streaming { .. }) {
                    self.on_prepared_stream(&m, durable);
                } else {
                    self.on_prepared(&m, durable);
                    self.bytes_verified = self.bytes_done;
                }
            }
            RecvIoDone::Stored { chunk, slots } => {
                self.settle(&m, chunk);
                self.have.set(chunk, true);
                let len = m.unique(chunk).map_or(0, |u| u64::from(u.len));
                self.bytes_verified += len * slots.len() as u64;
                self.progress(&m, self.bytes_verified);
                self.uncommitted_bytes += len * slots.len() as u64;
                self.uncommitted.extend(slots);
                if self.uncommitted_since.is_none() {
                    self.uncommitted_since = self.now;
                }
                if self.commit_due() || self.all_stored() || self.stream.grow_due {
                    self.flush_commit();
                }
                self.maybe_finalize(&m);
                self.maybe_grow();
            }
            RecvIoDone::Corrupt { chunk, error } => {
                self.settle(&m, chunk);
                if matches!(self.state, State::Draining | State::Done) {
                    return;
                }
                let n = match &mut self.state {
                    State::Transferring(t)
                    | State::Finalizing(t)
                    | State::Streaming { transfer: t, .. } => {
                        let n = t.rejects.entry(chunk).or_insert(0);
                        *n += 1;
                        *n
                    }
                    // Stores are only issued while transferring.
                    _ => 1,
                };
                if n > self.cfg.max_rejects_per_chunk {
                    let path = slot_path(&m, m.unique(chunk).map_or(SlotId(0), |u| u.first_slot));
                    self.fail(SessionError::Integrity(format!(
                        "{path}: chunk {chunk} failed verification {n} times ({error})"
                    )));
                    return;
                }
                self.have.set(chunk, false);
                self.want_again(chunk, true);
            }
            RecvIoDone::Committed { slots } => {
                self.committing = false;
                for s in slots {
                    if !self.durable.get(s) {
                        self.durable.set(s, true);
                        self.slots_durable += 1;
                        if let Some(l) = m.locate(s) {
                            self.bytes_done += u64::from(l.len);
                            self.file_slot_durable(l.entry, true);
                        }
                    }
                }
                self.progress(&m, self.bytes_verified.max(self.bytes_done));
                let last = self.all_stored() && self.uncommitted.is_empty();
                self.report_durable(last);
                if !self.uncommitted.is_empty()
                    && (self.commit_due()
                        || matches!(self.state, State::Draining)
                        || self.all_stored()
                        || self.stream.grow_due)
                {
                    self.flush_commit();
                }
                self.maybe_finalize(&m);
                self.maybe_grow();
            }
            RecvIoDone::CopyFailed { chunk, damaged } => {
                self.settle(&m, chunk);
                self.on_damaged(&m, damaged);
                self.maybe_grow();
            }
            RecvIoDone::Damaged { slots } => {
                self.exclusive_io = false;
                if let State::Finalizing(t) = &mut self.state {
                    self.state = State::Transferring(std::mem::take(t));
                }
                self.on_damaged(&m, slots);
            }
            RecvIoDone::Finalized => {
                self.exclusive_io = false;
                self.state = State::Done;
                self.control.push_back(Transmit::control(
                    frame::encode_message(&Message::Done { root: m.root() }).unwrap_or_default(),
                ));
                self.events.push_back(RecvEvent::Done(*m.summary()));
            }
            RecvIoDone::Failed { error } => {
                self.exclusive_io = false;
                self.busy = self.busy.saturating_sub(1);
                self.committing = false;
                self.fail(SessionError::Destination(error));
                // Nothing more can be written: forget what was not committed.
                self.uncommitted.clear();
                self.uncommitted_bytes = 0;
                self.busy = 0;
                self.busy_bytes = 0;
            }
        }
    }

    /// A progress event — once the manifest is complete: while it streams in, its totals are
    /// not known (the application hears of the bytes already here with the first one after).
    fn progress(&mut self, m: &Manifest, bytes_done: u64) {
        if matches!(self.state, State::Streaming { .. }) {
            return;
        }
        self.events.push_back(RecvEvent::Progress {
            bytes_done,
            bytes_total: m.summary().bytes,
            wire_bytes: self.wire_bytes,
            files_done: self.files_done,
        });
    }

    fn on_damaged(&mut self, m: &Manifest, slots: Vec<SlotId>) {
        if matches!(self.state, State::Draining | State::Done) {
            return;
        }
        let mut chunks = Vec::new();
        for s in slots {
            if self.durable.get(s) {
                self.durable.set(s, false);
                self.slots_durable -= 1;
                if let Some(l) = m.locate(s) {
                    self.file_slot_durable(l.entry, false);
                    self.bytes_done -= u64::from(l.len);
                    self.bytes_verified = self.bytes_verified.saturating_sub(u64::from(l.len));
                }
            }
            if let Some(c) = m.slot_chunk(s) {
                chunks.push(c);
            }
        }
        chunks.sort_unstable();
        chunks.dedup();
        // Queued copies of these chunks would read a slot that no longer holds them: the chunk
        // arrives from the sender instead and is written to every slot still missing it.
        if let State::Transferring(t)
        | State::Finalizing(t)
        | State::Streaming { transfer: t, .. } = &mut self.state
        {
            t.copies
                .retain(|(c, _, _)| chunks.binary_search(c).is_err());
        }
        for c in chunks {
            self.have.set(c, false);
            if !self.wanted.get(c) {
                self.want_again(c, false);
            }
        }
    }

    /// Counts the files complete once the store is prepared (each file's slots not durable).
    fn count_files(&mut self, m: &Manifest) {
        self.file_missing = m
            .entries()
            .iter()
            .map(|e| e.slots().filter(|&s| !self.durable.get(s)).count() as u32)
            .collect();
        self.files_done = m
            .entries()
            .iter()
            .zip(&self.file_missing)
            .filter(|(e, &n)| e.is_file() && n == 0)
            .count() as u64;
    }

    /// A slot of file `entry` became durable (or, `false`, stopped being so).
    fn file_slot_durable(&mut self, entry: crate::manifest::EntryId, durable: bool) {
        let Some(n) = self.file_missing.get_mut(entry.index()) else {
            return;
        };
        match (durable, *n) {
            (true, 1) => self.files_done += 1,
            (false, 0) => self.files_done = self.files_done.saturating_sub(1),
            _ => {}
        }
        *n = if durable { n.saturating_sub(1) } else { *n + 1 };
    }

    fn settle(&mut self, m: &Manifest, chunk: ChunkId) {
        self.busy = self.busy.saturating_sub(1);
        let len = m.unique(chunk).map_or(0, |u| u64::from(u.len));
        self.busy_bytes = self.busy_bytes.saturating_sub(len);
    }

    fn want_again(&mut self, chunk: ChunkId, rejected: bool) {
        self.wanted.set(chunk, true);
        self.wanted_left += 1;
        if rejected {
            self.send(&Message::Rejected { chunk });
        }
        self.send(&Message::Want(vec![ChunkRange {
            start: chunk,
            end: chunk.next(),
        }]));
    }

    /// The manifest arrived whole and checked: tell the application, name what the
    /// destination cannot hold.
    fn manifest_complete(&mut self, m: &Manifest, summary: ManifestSummary) {
        self.events.push_back(RecvEvent::Manifest(summary));
        let paths = crate::store::omitted_entries(m, self.cfg.symlinks);
        if !paths.is_empty() {
            self.events.push_back(RecvEvent::Unrepresentable {
                paths,
                reason: "the destination's file system cannot hold symlinks",
            });
        }
    }

    /// Sizes the chunk and slot sets for `m` (a longer prefix keeps what they hold).
    fn grow_tables(&mut self, m: &Manifest) {
        let uniques = m.unique_chunks().len();
        self.have.grow(uniques);
        self.wanted.grow(uniques);
        self.durable.grow(m.slot_count() as usize);
    }

    /// Streaming: prepares the store for a longer prefix of the manifest (or the whole of it,
    /// once it ended) when one is due — the first entries, a prefix twice as long as the last,
    /// or more entries while nothing is wanted. Chunks wait (see
    /// [`can_accept_chunk`](Self::can_accept_chunk)) until every store and commit settled:
    /// preparing compacts the journal and reopens staging files.
    fn maybe_grow(&mut self) {
        let State::Streaming { builder, .. } = &self.state else {
            return;
        };
        if self.exclusive_io {
            return;
        }
        let n = builder.as_ref().map_or(0, |b| b.len());
        let p = self.stream.prepared_entries;
        let due = self.stream.grow_due
            || self.stream.full.is_some()
            || (n > p && (p == 0 || n >= 2 * p || self.wanted_left == 0));
        if !due {
            return;
        }
        self.stream.grow_due = true;
        self.flush_commit();
        if self.busy > 0 || self.committing || !self.uncommitted.is_empty() {
            return;
        }
        let m = match (&self.stream.full, &self.state) {
            (Some(m), _) => Arc::clone(m),
            (
                None,
                State::Streaming {
                    builder: Some(b), ..
                },
            ) => Arc::new(b.prefix().clone()),
            _ => return,
        };
        self.stream.grow_due = false;
        self.stream.prepared_entries = m.entries().len();
        self.grow_tables(&m);
        self.manifest = Some(Arc::clone(&m));
        self.io.push_back(RecvIo::Prepare { manifest: m });
        self.exclusive_io = true;
    }

    /// Streaming: the store is prepared for prefix `m` (or the whole manifest): ask for the
    /// chunks it adds. After the whole manifest, `WantEnd` closes the session's want list and
    /// the transfer runs on as in a manifest-first session.
    fn on_prepared_stream(&mut self, m: &Arc<Manifest>, durable: Vec<SlotId>) {
        let State::Streaming { transfer, .. } = &mut self.state else {
            return;
        };
        let mut transfer = std::mem::take(transfer);
        self.mark_durable(m, durable);
        self.count_files(m);
        self.bytes_verified = self.bytes_verified.max(self.bytes_done);
        // Copies are planned afresh: new slots may hold chunks already here.
        transfer.copies.clear();
        let (ranges, chunks, bytes) = self.plan(m, &mut transfer);
        self.wanted_left += chunks;
        self.stream.wanted_chunks += chunks;
        self.stream.wanted_bytes += bytes;
        for part in ranges.chunks(MAX_RANGES_PER_FRAME) {
            self.send(&Message::Want(part.to_vec()));
        }
        let whole = self.stream.full.as_ref().is_some_and(|f| Arc::ptr_eq(f, m));
        if whole {
            let (chunks, bytes) = (self.stream.wanted_chunks, self.stream.wanted_bytes);
            self.send(&Message::WantEnd { chunks, bytes });
            self.events.push_back(RecvEvent::Wanted { chunks, bytes });
            self.state = State::Transferring(transfer);
            // What arrived while the manifest streamed in.
            self.progress(m, self.bytes_verified.max(self.bytes_done));
            self.report_durable(true);
            self.maybe_finalize(m);
        } else if let State::Streaming { transfer: t, .. } = &mut self.state {
            *t = transfer;
            self.maybe_grow();
        }
    }

    /// Marks the slots the store found durable.
    fn mark_durable(&mut self, m: &Manifest, durable: Vec<SlotId>) {
        for s in durable {
            if s.0 < m.slot_count() && !self.durable.get(s) {
                self.durable.set(s, true);
                self.slots_durable += 1;
                if let Some(l) = m.locate(s) {
                    self.bytes_done += u64::from(l.len);
                }
            }
        }
    }

    fn on_prepared(&mut self, m: &Arc<Manifest>, durable: Vec<SlotId>) {
        if !matches!(self.state, State::Preparing) {
            return;
        }
        let mut transfer = Transfer::default();
        self.mark_durable(m, durable);
        self.count_files(m);
        let (ranges, want_chunks, want_bytes) = self.plan(m, &mut transfer);
        self.wanted_left = want_chunks;
        if self.bytes_done > 0 {
            self.events.push_back(RecvEvent::Resumed {
                bytes_have: self.bytes_done,
                bytes_total: m.summary().bytes,
            });
        }
        for part in ranges.chunks(MAX_RANGES_PER_FRAME) {
            self.send(&Message::Want(part.to_vec()));
        }
        self.send(&Message::WantEnd {
            chunks: want_chunks,
            bytes: want_bytes,
        });
        self.events.push_back(RecvEvent::Wanted {
            chunks: want_chunks,
            bytes: want_bytes,
        });
        self.state = State::Transferring(transfer);
        self.report_durable(true);
        self.maybe_finalize(m);
    }

    /// What to do for each unique chunk of `m` not already asked for: copy it locally when a
    /// slot holds it durably (to its other slots), else ask the sender. Chunks in the
    /// manifest's transfer order (databases, then small files first), each once; the sender
    /// serves the ranges in the order they are asked for. Returns the ranges, and the chunks
    /// and bytes they hold.
    fn plan(&mut self, m: &Manifest, transfer: &mut Transfer) -> (Vec<ChunkRange>, u64, u64) {
        let mut ranges: Vec<ChunkRange> = Vec::new();
        let (mut want_chunks, mut want_bytes) = (0u64, 0u64);
        let mut seen = BitSet::new(m.unique_chunks().len());
        let ids = m.transfer_order().into_iter().flat_map(|i| {
            let e = m.entry(i);
            e.into_iter()
                .flat_map(|e| e.slots())
                .filter_map(|s| m.slot_chunk(s))
        });
        for id in ids {
            if seen.get(id) || self.wanted.get(id) {
                continue;
            }
            seen.set(id, true);
            let Some(u) = m.unique(id) else { continue };
            let mut from = None;
            let mut missing = Vec::new();
            for s in m.slots_of(id) {
                if self.durable.get(s) {
                    from.get_or_insert(s);
                } else {
                    missing.push(s);
                }
            }
            match from {
                Some(f) => {
                    self.have.set(id, true);
                    if !missing.is_empty() {
                        transfer.copies.push_back((id, f, missing));
                    }
                }
                None => {
                    self.have.set(id, false);
                    self.wanted.set(id, true);
                    want_chunks += 1;
                    want_bytes += u64::from(u.len);
                    match ranges.last_mut() {
                        Some(r) if r.end == id => r.end = id.next(),
                        _ => ranges.push(ChunkRange {
                            start: id,
                            end: id.next(),
                        }),
                    }
                }
            }
        }
        (ranges, want_chunks, want_bytes)
    }

    /// Tells a version-3 sender the durable bytes, if they grew: now when `now` is set or
    /// [`REPORT_EVERY`] has passed since the last report, else once it has (see
    /// [`handle_timeout`](Self::handle_timeout)). Only while the round runs.
    fn report_durable(&mut self, now: bool) {
        let running = matches!(
            self.state,
            State::Transferring(_) | State::Finalizing(_) | State::Streaming { .. }
        );
        if self.peer_version < 3 || !running || self.bytes_done <= self.reported {
            self.report_pending = false;
            return;
        }
        let due = match (self.now, self.reported_at) {
            (Some(t), Some(last)) => t >= last + REPORT_EVERY,
            _ => true,
        };
        if !(now || due) {
            self.report_pending = true;
            return;
        }
        self.report_pending = false;
        self.reported = self.bytes_done;
        self.reported_at = self.now;
        self.send(&Message::Durable {
            bytes: self.bytes_done,
        });
    }

    fn send(&mut self, m: &Message) {
        match frame::encode_message(m) {
            Ok(b) => self.control.push_back(Transmit::control(b)),
            Err(e) => self.fail(SessionError::Protocol(format!("cannot encode: {e}"))),
        }
    }

    /// Nothing is wanted, being written or waiting to be copied.
    /// A group commit is due by size: bytes, or slots (tiny files).
    fn commit_due(&self) -> bool {
        self.uncommitted_bytes >= self.cfg.commit_bytes
            || self.uncommitted.len() >= self.cfg.commit_slots
    }

    fn all_stored(&self) -> bool {
        let no_copies = match &self.state {
            State::Transferring(t)
            | State::Finalizing(t)
            | State::Streaming { transfer: t, .. } => t.copies.is_empty(),
            _ => true,
        };
        self.wanted_left == 0 && self.busy == 0 && no_copies
    }

    fn flush_commit(&mut self) {
        if self.committing || self.uncommitted.is_empty() {
            return;
        }
        self.committing = true;
        self.uncommitted_bytes = 0;
        self.uncommitted_since = None;
        let slots = std::mem::take(&mut self.uncommitted);
        self.io.push_back(RecvIo::Commit { slots });
    }

    fn maybe_finalize(&mut self, m: &Manifest) {
        if matches!(self.state, State::Transferring(_))
            && self.slots_durable == u64::from(m.slot_count())
            && self.all_stored()
            && !self.committing
            && self.uncommitted.is_empty()
        {
            if let State::Transferring(t) = &mut self.state {
                self.state = State::Finalizing(std::mem::take(t));
            }
            self.io.push_back(RecvIo::Finalize);
            self.exclusive_io = true;
        }
    }

    fn fail(&mut self, e: SessionError) {
        self.control
            .push_back(close_frame(e.close_code(), &e.to_string()));
        self.events.push_back(RecvEvent::Failed(e));
        self.state = State::Draining;
        self.flush_commit();
    }

    /// Advances the clock: group commits and stall detection.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = Some(now);
        if self.report_pending {
            self.report_durable(false);
        }
        if let Some(since) = self.uncommitted_since {
            if now >= since + self.cfg.commit_interval {
                self.flush_commit();
            }
        }
        if let State::AwaitHello { last_frame_at } | State::Manifest { last_frame_at, .. } =
            &mut self.state
        {
            match *last_frame_at {
                None => *last_frame_at = Some(now),
                Some(t) if now >= t + self.cfg.stall_timeout => {
                    let what = if matches!(self.state, State::AwaitHello { .. }) {
                        "no hello"
                    } else {
                        "no manifest data"
                    };
                    self.stalled(what, self.cfg.stall_timeout);
                }
                Some(_) => {}
            }
        }
        if let (State::Transferring(tr) | State::Streaming { transfer: tr, .. }, true) =
            (&mut self.state, self.wanted_left > 0)
        {
            match tr.last_chunk_at {
                None => tr.last_chunk_at = Some(now),
                Some(t) if now >= t + self.cfg.stall_timeout => {
                    self.stalled("no data", self.cfg.stall_timeout);
                }
                Some(_) => {}
            }
        }
        // A streaming sender may hash one large file for minutes before its next entry; only
        // a far longer silence ends the session.
        if let (State::Streaming { last_frame_at, .. }, 0) = (&mut self.state, self.wanted_left) {
            let limit = self.cfg.stall_timeout * STREAM_SILENCE_FACTOR;
            match *last_frame_at {
                None => *last_frame_at = Some(now),
                Some(t) if now >= t + limit => self.stalled("no manifest data", limit),
                Some(_) => {}
            }
        }
    }

    fn stalled(&mut self, what: &str, after: Duration) {
        self.events
            .push_back(RecvEvent::Failed(SessionError::PeerClosed {
                code: Some(CloseCode::Timeout),
                reason: format!("{what} from the sender for {} s", after.as_secs()),
            }));
        self.control.push_back(close_frame(
            CloseCode::Timeout,
            &format!("stalled: {what} received"),
        ));
        self.state = State::Draining;
        self.flush_commit();
    }

    /// When `handle_timeout` should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        // While a commit is being written the next one cannot start: no commit deadline until
        // it is done (an overdue deadline here made the driver wake in a busy loop for the
        // whole length of every group commit).
        let commit = match self.committing {
            true => None,
            false => self.uncommitted_since.map(|t| t + self.cfg.commit_interval),
        };
        let stall = match &self.state {
            State::Transferring(tr) | State::Streaming { transfer: tr, .. }
                if self.wanted_left > 0 =>
            {
                tr.last_chunk_at.map(|t| t + self.cfg.stall_timeout)
            }
            State::AwaitHello { last_frame_at } | State::Manifest { last_frame_at, .. } => {
                last_frame_at.map(|t| t + self.cfg.stall_timeout)
            }
            State::Streaming { last_frame_at, .. } => {
                last_frame_at.map(|t| t + self.cfg.stall_timeout * STREAM_SILENCE_FACTOR)
            }
            _ => None,
        };
        let running = matches!(
            self.state,
            State::Transferring(_) | State::Finalizing(_) | State::Streaming { .. }
        );
        let report = match (self.report_pending && running, self.reported_at) {
            (true, Some(last)) => Some(last + REPORT_EVERY),
            _ => None,
        };
        [commit, stall, report].into_iter().flatten().min()
    }

    /// The next frame to send (all receiver frames are control frames).
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.control.pop_front()
    }

    /// The next I/O to perform.
    #[must_use]
    pub fn poll_io(&mut self) -> Option<RecvIo> {
        // Stores wait for a prepare (a streaming prefix) to finish.
        let held = self.exclusive_io
            && matches!(
                self.io.front(),
                Some(RecvIo::Store { .. } | RecvIo::Copy { .. })
            );
        if held {
            return None;
        }
        if let Some(io) = self.io.pop_front() {
            return Some(io);
        }
        if let State::Transferring(t) | State::Streaming { transfer: t, .. } = &mut self.state {
            if self.busy_bytes >= self.cfg.max_pending_bytes || self.exclusive_io {
                return None;
            }
            let (chunk, from, to) = t.copies.pop_front()?;
            let len = self
                .manifest
                .as_ref()
                .and_then(|m| m.unique(chunk))
                .map_or(0, |u| u.len);
            self.busy += 1;
            self.busy_bytes += u64::from(len);
            return Some(RecvIo::Copy { chunk, from, to });
        }
        None
    }

    /// The next event for the application.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<RecvEvent> {
        self.events.pop_front()
    }
}

fn slot_path(m: &Manifest, slot: SlotId) -> String {
    m.locate(slot)
        .and_then(|l| m.entry(l.entry))
        .map_or_else(|| format!("slot {slot}"), |e| e.path.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ChunkHash, EntryKind, Mtime, WireEntry};
    use std::path::PathBuf;

    /// A receiver that has the manifest of one small file and asked its store to prepare.
    fn preparing() -> Receiver {
        let data = b"hello";
        let m = Manifest::from_wire_entries(vec![WireEntry {
            path: "a.txt".into(),
            kind: EntryKind::File { chunk_shift: 17 },
            size: data.len() as u64,
            mode: 0o644,
            mtime: Mtime::default(),
            hashes: vec![ChunkHash::of(data)],
        }])
        .unwrap();
        let mut r = Receiver::new(ReceiverConfig::default());
        r.handle_frame(Frame::Hello(Hello {
            version: frame::PROTOCOL_VERSION,
            role: Role::Sender,
        }));
        r.handle_frame(Frame::Message(Message::Manifest(vec![m
            .wire_entry(0)
            .unwrap()])));
        r.handle_frame(Frame::Message(Message::ManifestEnd(*m.summary())));
        assert!(matches!(r.poll_io(), Some(RecvIo::Prepare { .. })));
        r
    }

    #[test]
    fn store_failures_stay_typed_up_to_the_session_error() {
        let path = PathBuf::from("/dest/a.txt");
        let kinds = [
            StoreError::NoSpace { path: path.clone() },
            StoreError::ReadOnly { path: path.clone() },
            StoreError::Io {
                path: path.clone(),
                source: std::io::Error::other("disk on fire"),
            },
        ];
        for kind in kinds {
            let shown = format!("destination problem: {kind}");
            let mut r = preparing();
            r.handle_io_done(RecvIoDone::Failed {
                error: Arc::new(kind),
            });
            let failed = std::iter::from_fn(|| r.poll_event())
                .find_map(|e| match e {
                    RecvEvent::Failed(e) => Some(e),
                    _ => None,
                })
                .unwrap();
            let SessionError::Destination(store) = &failed else {
                panic!("{failed:?}");
            };
            // The kind survives, and so does the text users see.
            assert!(
                matches!(
                    (&**store, shown.as_str()),
                    (StoreError::NoSpace { .. }, s) if s.contains("no space left")
                ) || matches!(
                    (&**store, shown.as_str()),
                    (StoreError::ReadOnly { .. }, s) if s.contains("read-only file system")
                ) || matches!(
                    (&**store, shown.as_str()),
                    (StoreError::Io { source, .. }, s)
                        if s.contains("disk on fire") && source.to_string() == "disk on fire"
                )
            );
            assert_eq!(failed.to_string(), shown);
            assert_eq!(failed.close_code(), CloseCode::DestinationError);
            // The sender hears the same text as the close reason.
            let close = std::iter::from_fn(|| r.poll_transmit())
                .filter_map(|t| {
                    let mut b = bytes::BytesMut::from(&t.head[..]);
                    frame::decode_frame(&mut b).ok().flatten()
                })
                .find_map(|f| match f {
                    Frame::Message(Message::Close { code, reason }) => Some((code, reason)),
                    _ => None,
                })
                .unwrap();
            assert_eq!(close, (CloseCode::DestinationError as u16, shown));
        }
    }
}
