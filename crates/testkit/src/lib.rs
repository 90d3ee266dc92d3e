//! ferry-testkit

pub mod netns;
