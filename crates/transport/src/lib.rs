//! ferry-transport: device identity, a QUIC endpoint that admits only pinned keys (or a peer
//! completing PAKE pairing), discovery (mDNS, tickets/QR, explicit address) and diagnostics.
//!
//! Sender (old device):
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use ferry_transport::*;
//! let dirs = FerryDirs::from_env()?;
//! let identity = Identity::load_or_create(&dirs.config, "Old phone")?;
//! let peers = PeerStore::open(&dirs.config)?;
//! let ep = Endpoint::bind(identity, peers, EndpointConfig::default())?;
//! let code = ep.issue_pairing_code()?;
//! let ticket = ep.ticket(code)?;
//! println!("{ticket}\n{}", ticket.to_qr_unicode()?);
//! let conn = loop {
//!     match ep.accept().await {
//!         Ok(c) => break c,
//!         Err(AcceptError::EndpointClosed) => return Ok(()),
//!         Err(e) => eprintln!("{e}"), // wrong code: issue a new code to retry
//!     }
//! };
//! let (mut send, mut recv) = conn.accept_bi().await?;
//! # Ok(()) }
//! ```
//! Receiver (new device): `ep.connect_ticket(&ticket)`, `ep.connect_with_code(&addrs, code)`,
//! or, once paired, `ep.connect_peer(device_id, &[])`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![warn(missing_docs)]

pub mod dirs;
pub mod discovery;
pub mod doctor;
pub mod endpoint;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod pairing;
pub mod peers;
pub mod ticket;
pub mod tls;

pub use dirs::{DirsError, FerryDirs};
pub use discovery::{
    Advertisement, DiscoveredSender, Discovery, DiscoveryError, MdnsConfig, MdnsDiscovery,
    MdnsInterface, MdnsInterfaces,
};
pub use doctor::{doctor, DoctorConfig, DoctorReport, InterfaceReport, MdnsSelfTest};
pub use endpoint::{
    AcceptError, BindError, Congestion, ConnectError, Endpoint, EndpointConfig, PairingGate,
    PairingLimits, PeerConnection, PeerInfo,
};
pub use identity::{DeviceId, DeviceIdError, Identity, IdentityError};
pub use pairing::{PairingCode, PairingCodeError, PairingError};
pub use peers::{NotUsable, PeerRecord, PeerRole, PeerStore, PeerStoreError, DEFAULT_PAIRING_TTL};
pub use quinn::{ConnectionError, ReadError, RecvStream, SendStream, VarInt, WriteError};
pub use ticket::{Ticket, TicketError};

/// ALPN: protocol name and version. A peer speaking anything else fails the TLS handshake.
pub const ALPN: &[u8] = b"ferry/1";

/// Application close codes used by the transport. Applications use codes `>= 0x100`.
pub mod close {
    use crate::pairing::PairingError;

    /// Normal end.
    pub const DONE: u32 = 0;
    /// Unknown key and no pairing code active.
    pub const NOT_PAIRED: u32 = 1;
    /// Pairing key confirmation failed (wrong code or relayed session).
    pub const PAIRING_FAILED: u32 = 2;
    /// Malformed or unexpected session message.
    pub const PROTOCOL_ERROR: u32 = 3;
    /// Session/pairing handshake timed out.
    pub const TIMEOUT: u32 = 4;
    /// A parallel connection attempt lost the race.
    pub const SUPERSEDED: u32 = 5;
    /// The server serves only another device (`ferry send --to`).
    pub const NOT_SERVED: u32 = 6;

    // Codes of the migration (`ferry-migrate`), from 0x100. Its crate docs say when each is
    // used and what the other side makes of it.

    /// The migration (or a pairing) is complete; the receiver waits for this before it exits.
    pub const COMPLETE: u32 = 0x100;
    /// The link was cut on purpose (`ferry demo`, tests): the receiver reconnects.
    pub const LINK_CUT: u32 = 0x101;
    /// Replaced: the same device connected again (the old connection is dead), or the sender
    /// answers at another address.
    pub const REPLACED: u32 = 0x102;
    /// The sender is serving another device.
    pub const BUSY: u32 = 0x103;
    /// The receiver stopped holding a complete, verified round: nothing is unfinished.
    pub const RECEIVER_STOPPED: u32 = 0x104;
    /// This side stopped (or failed, with its reason sent first) before the migration ended;
    /// the other keeps what it verified.
    pub const STOPPED: u32 = 0x105;

    pub(crate) fn pairing_error(code: u32) -> Option<PairingError> {
        match code {
            NOT_PAIRED => Some(PairingError::NotPaired),
            PAIRING_FAILED => Some(PairingError::WrongCode),
            TIMEOUT => Some(PairingError::Timeout),
            NOT_SERVED => Some(PairingError::NotServed),
            _ => None,
        }
    }
}
