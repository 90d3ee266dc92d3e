//! ferry-testkit: test support for ferry (not published).
//!
//! - [`history`]: a realistic chat-history generator ([`generate`]), a [`LiveWriter`] that keeps
//!   writing into it like the running app, and tree comparison ([`assert_trees_equal`]).
//! - [`netns`]: network namespaces, bridges and veth links for LAN tests (root only).
//! - [`proc`]: process CPU time for benchmarks.

pub mod history;
pub mod netns;
pub mod proc;

pub use history::{
    assert_histories_equal, assert_trees_equal, database_digest, generate, history_diff,
    integrity_check, is_sqlite, tree_diff, Commit, Difference, EntryKind, HistoryReport,
    HistorySpec, LiveConfig, LiveStats, LiveWriter,
};
