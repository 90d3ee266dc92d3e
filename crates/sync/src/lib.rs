//! ferry's migration core.
//!
//! A chat history is described by a [`Manifest`]: every entry (path, kind, size, mode, mtime) and,
//! per file, an ordered list of fixed-size chunks named by their BLAKE3 hash. The manifest's root
//! hash names the whole snapshot. The receiver always knows exactly which verified chunks it holds
//! (its journal), so an interruption of any kind costs at most the chunks that were in flight.
//!
//! Layout:
//! - [`manifest`]: entries, chunking policy, the unique-chunk table and the root hash; [`path`]
//!   checks every path a peer sends before it is used.
//! - [`proto`]: the wire format (frames, versioned hello, close codes) and the two protocol state
//!   machines, [`proto::Sender`] and [`proto::Receiver`]. They are sans-IO: no sockets, no clock,
//!   no filesystem; inputs are `handle_*`, outputs `poll_*`.
//! - [`scan`]: walking and hashing a history directory, with a persistent [`scan::HashCache`];
//!   [`snapshot`] copies live SQLite databases consistently through SQLite for it.
//! - [`store`]: the crash-safe receiver store (staging, journal, finalize, receipt, verify).
//! - [`compress`]: the per-chunk zstd policy and the bounded decoder.
//! - [`driver`]: runs the machines over async byte streams (e.g. QUIC streams).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod compress;
pub mod driver;
#[doc(hidden)]
pub mod fuzzing;
pub mod manifest;
pub mod path;
pub mod platform;
pub mod private;
pub mod proto;
pub mod scan;
pub mod snapshot;
pub mod source;
pub mod store;

pub use manifest::{ChunkHash, Entry, EntryKind, Manifest};
