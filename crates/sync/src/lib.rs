//! ferry-sync
