//! ferry-transport
