//! ferry-testkit: test support for ferry (not published).
//!
//! - [`history`]: a realistic chat-history generator ([`generate`]), a [`LiveWriter`] that keeps
//!   writing into it like the running app, and tree comparison ([`assert_trees_equal`]).
//! - [`netns`]: network namespaces, bridges and veth links for LAN tests (root only).
//! - [`proc`]: process CPU time for benchmarks.
//! - [`quic_flood`]: a flood of QUIC Initials with truncated ClientHellos (handshakes that never
//!   finish), for the endpoint's admission tests.
//! - [`udp_proxy`]: a user-space UDP proxy that delays, jitters, reorders and drops datagrams.

pub mod history;
pub mod netns;
pub mod proc;
pub mod quic_flood;
pub mod udp_proxy;

pub use history::{
    assert_histories_equal, assert_trees_equal, database_digest, generate, history_diff,
    integrity_check, is_sqlite, tree_diff, Commit, Difference, EntryKind, HistoryReport,
    HistorySpec, LiveConfig, LiveStats, LiveWriter,
};

/// `n` deterministic, incompressible bytes from `seed` (xorshift): file content for tests that
/// need distinct data without a generator.
pub fn rand_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
