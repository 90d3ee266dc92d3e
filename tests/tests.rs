//! ferry's integration tests: one binary (`cargo test --test integration`) that drives the real
//! `ferry` executable over loopback. Every device gets its own `FERRY_HOME`. On loopback,
//! senders never announce on mDNS (`--no-mdns`) and receivers are given the address: nothing
//! sends multicast on the host. Only `lan::lan_sender_moves_…` uses mDNS, inside the network
//! namespaces it creates (root only).

mod util;

mod cli;
mod crashloop;
mod damage;
mod destination;
mod edge_cases;
mod faults;
mod hostile_quic;
mod lan;
mod live;
mod migrate;
mod pairing;
mod pairing_scope;
mod progress;
mod resume;
mod rounds;
mod space;
mod terminal;
