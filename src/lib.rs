//! The glue that joins ferry's libraries into a migration: one session of the sync protocol
//! (`ferry-sync`) over an authenticated QUIC connection (`ferry-transport`). The `ferry` binary
//! and the examples use it.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod session;
