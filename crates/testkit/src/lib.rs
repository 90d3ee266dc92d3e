//! ferry-testkit: test support for ferry (not published).
//!
//! - [`history`]: a realistic chat-history generator ([`generate`]), a [`LiveWriter`] that keeps
//!   writing into it like the running app, and tree comparison ([`assert_trees_equal`]).

pub mod history;

pub use history::{
    assert_trees_equal, generate, tree_diff, Difference, EntryKind, HistoryReport, HistorySpec,
    LiveConfig, LiveStats, LiveWriter,
};
