//! Pairing and the session handshake, run on the first bidirectional stream of a connection.
//!
//! # Protocol (`ferry/1` session stream)
//! Frames are `u16` big-endian length + postcard, at most [`MAX_FRAME`] bytes.
//!
//! 1. client → `ClientMsg::Hello { magic, name, pake }`. `pake` is the client's SPAKE2 message
//!    when it holds a pairing code, `None` when it expects the server to have pinned its key.
//! 2. server → `ServerMsg::Hello { name, reply: Accepted }` (client key pinned, no code used),
//!    or `Hello { reply: Pake(msg) }` (the server's SPAKE2 message; the server's active code is
//!    burned at this point, whatever the outcome), or `Rejected(reason)`.
//! 3. pairing only: both compute K = SPAKE2(code) and the transcript
//!    `T = BLAKE3("ferry/1 pairing transcript" ‖ EKM ‖ id_server ‖ id_client ‖ names ‖ msgs)`
//!    where EKM = TLS exporter (label [`EKM_LABEL`], 32 bytes) of *this* connection and the ids
//!    are BLAKE3 of each side's certificate key. client → `Confirm(MAC(K_c, T))`; the server
//!    checks it (wrong code or relayed session: `Rejected(WrongCode)` + close) and answers
//!    `Confirm(MAC(K_s, T))`; the client checks it and sends `Done`.
//!    MAC = BLAKE3 keyed with `derive_key(role context, K)`.
//! 4. pairing only, the confirmed ending (both sides persist the other's key before either
//!    reports success): the server pins the client, then sends `Paired`; the client pins the
//!    server, then finishes its stream (FIN). The client reports success once the server's QUIC
//!    stack acknowledged that FIN; the server, once it read it. A side that fails before that
//!    (connection lost, timeout, store error) removes the pin it wrote (restoring an earlier
//!    pairing of the same device) and reports failure: a pairing never ends with one side
//!    paired because the other closed too early. (As with any two-party ending over a lossy
//!    link, a link cut in the one round trip between the server reading the FIN and the
//!    client getting its acknowledgement still leaves the server paired and the client not.)
//!
//! A relaying man-in-the-middle terminates two TLS sessions with its own key: EKM and the ids
//! differ between the two sides, so neither confirmation verifies even if it knows the code.
//! A wrong code costs the code: the server needs a new one for the next attempt.

use std::fmt;
use std::str::FromStr;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use spake2::{Ed25519Group, Identity as SpakeIdentity, Password, Spake2};

use crate::identity::DeviceId;

/// Largest session frame.
pub const MAX_FRAME: usize = 4096;
/// TLS exporter label binding pairing to the QUIC/TLS session.
pub const EKM_LABEL: &[u8] = b"EXPORTER-ferry/1-pairing";
const MAGIC: u32 = 0x6665_7231; // "fer1"
const SPAKE_ID: &[u8] = b"ferry/1 pairing";

/// A one-time pairing code: 8 decimal digits (≈ 26.6 bits), shown as `1234-5678`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PairingCode(u32);

impl PairingCode {
    /// A fresh random code from the OS CSPRNG.
    pub fn random() -> Result<Self, PairingError> {
        use ring::rand::SecureRandom;
        let rng = ring::rand::SystemRandom::new();
        loop {
            let mut b = [0u8; 4];
            rng.fill(&mut b).map_err(|_| PairingError::Rng)?;
            let v = u32::from_le_bytes(b);
            // Rejection sampling: no modulo bias.
            if v < 4_200_000_000 {
                return Ok(Self(v % 100_000_000));
            }
        }
    }

    /// The code as a number (`0..100_000_000`), for compact encodings.
    pub fn as_u32(&self) -> u32 {
        self.0
    }

    /// The code from a number; `None` when it has more than 8 digits.
    pub fn from_u32(v: u32) -> Option<Self> {
        (v < 100_000_000).then_some(Self(v))
    }

    fn password(&self) -> Password {
        Password::new(format!("{:08}", self.0).as_bytes())
    }
}

impl fmt::Display for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:04}", self.0 / 10_000, self.0 % 10_000)
    }
}

impl fmt::Debug for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairingCode(****-****)")
    }
}

/// Error parsing a [`PairingCode`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PairingCodeError {
    /// Not exactly 8 digits (dashes and spaces are ignored).
    #[error("a pairing code is 8 digits, like 1234-5678")]
    Format,
}

impl FromStr for PairingCode {
    type Err = PairingCodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 32 {
            return Err(PairingCodeError::Format);
        }
        let digits: String = s
            .chars()
            .filter(|c| *c != '-' && !c.is_whitespace())
            .collect();
        if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PairingCodeError::Format);
        }
        digits
            .parse()
            .map(Self)
            .map_err(|_| PairingCodeError::Format)
    }
}

/// Why the server refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RejectReason {
    /// The client is not paired and offered no pairing code.
    NotPaired,
    /// No unused pairing code is active on the server (expired, burned or never issued).
    NoPairingCode,
    /// Key confirmation failed: wrong code, or the session is being relayed.
    WrongCode,
    /// Malformed or unexpected message.
    Protocol,
}

/// Error during the session handshake or pairing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PairingError {
    /// Key confirmation failed: wrong code (or a relayed/tampered session). The code is burned.
    #[error("pairing failed: wrong code (the code is now used up; issue a new one)")]
    WrongCode,
    /// The server has no active unused pairing code (or refuses this address for now after
    /// its wrong codes).
    #[error("the other device has no active pairing code for us (expired, already used, or pairing is paused after wrong codes: look at its screen, and wait a few seconds before trying again)")]
    NoPairingCode,
    /// No new code can be issued yet: failed attempts in a row slow pairing down, and after a
    /// few pause it (see [`crate::endpoint::PairingLimits`]).
    #[error("{failures} failed pairing attempts in a row: {} a new code can be issued in {} s", if *.paused { "pairing is paused;" } else { "backing off;" }, .retry_in.as_secs_f64().ceil())]
    Throttled {
        /// Failed attempts in a row.
        failures: u32,
        /// Paused (rather than a short back-off).
        paused: bool,
        /// Time until a code can be issued.
        retry_in: std::time::Duration,
    },
    /// The peer is not paired and no code was offered.
    #[error("not paired with this device; pair with a code or ticket first")]
    NotPaired,
    /// The server serves only another device (`ferry send --to`).
    #[error("the other device is serving only another paired device (ferry send --to)")]
    NotServed,
    /// The peer broke the protocol.
    #[error("pairing protocol error: {0}")]
    Protocol(String),
    /// The handshake did not complete in time.
    #[error("pairing/session handshake timed out")]
    Timeout,
    /// The connection failed underneath.
    #[error("connection lost during session handshake: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The OS random generator failed.
    #[error("system random generator failed")]
    Rng,
    /// Persisting the paired peer failed.
    #[error(transparent)]
    Store(#[from] crate::peers::PeerStoreError),
    /// The codes matched, but the other device did not confirm that it stored this device's
    /// key (it closed, vanished or failed first): the pairing did not happen, and the key this
    /// side had stored was removed again (unless `kept`).
    #[error("the other device did not confirm the pairing ({reason}); {}", if *.kept {
        "its key could not be removed from this device's paired-devices list: remove it with `ferry peers --forget`, then pair again"
    } else {
        "nothing was kept: pair again with a new code"
    })]
    Unconfirmed {
        /// What happened instead of the confirmation.
        reason: String,
        /// This side could not remove the other's key it had already stored.
        kept: bool,
    },
}

impl From<RejectReason> for PairingError {
    fn from(r: RejectReason) -> Self {
        match r {
            RejectReason::NotPaired => Self::NotPaired,
            RejectReason::NoPairingCode => Self::NoPairingCode,
            RejectReason::WrongCode => Self::WrongCode,
            RejectReason::Protocol => Self::Protocol("rejected by peer".into()),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ClientMsg {
    Hello {
        magic: u32,
        name: String,
        pake: Option<Vec<u8>>,
    },
    Confirm([u8; 32]),
    Done,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum HelloReply {
    Accepted,
    Pake(Vec<u8>),
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ServerMsg {
    Hello {
        name: String,
        reply: HelloReply,
    },
    Confirm([u8; 32]),
    Rejected(RejectReason),
    /// Pairing only: the server pinned the client (after the client's `Done`).
    Paired,
}

pub(crate) async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), PairingError> {
    let body = postcard::to_allocvec(msg).map_err(|e| PairingError::Protocol(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(PairingError::Protocol("frame too large".into()));
    }
    let mut buf = Vec::with_capacity(body.len() + 2);
    buf.extend_from_slice(&(body.len() as u16).to_be_bytes());
    buf.extend_from_slice(&body);
    send.write_all(&buf).await.map_err(write_err)
}

fn write_err(e: quinn::WriteError) -> PairingError {
    match e {
        quinn::WriteError::ConnectionLost(c) => PairingError::Connection(c),
        other => PairingError::Protocol(other.to_string()),
    }
}

pub(crate) async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, PairingError> {
    let read_err = |e: quinn::ReadExactError| match e {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => {
            PairingError::Connection(c)
        }
        other => PairingError::Protocol(other.to_string()),
    };
    let mut len = [0u8; 2];
    recv.read_exact(&mut len).await.map_err(read_err)?;
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(PairingError::Protocol("frame too large".into()));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(read_err)?;
    postcard::from_bytes(&body).map_err(|e| PairingError::Protocol(e.to_string()))
}

/// What both sides hash into the confirmation transcript.
pub(crate) struct Binding<'a> {
    pub ekm: [u8; 32],
    pub server: DeviceId,
    pub client: DeviceId,
    pub server_name: &'a str,
    pub client_name: &'a str,
    pub client_msg: &'a [u8],
    pub server_msg: &'a [u8],
}

pub(crate) fn exporter(conn: &quinn::Connection) -> Result<[u8; 32], PairingError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EKM_LABEL, b"")
        .map_err(|_| PairingError::Protocol("TLS exporter unavailable".into()))?;
    Ok(out)
}

/// Returns (client MAC, server MAC).
pub(crate) fn confirmations(key: &[u8], b: &Binding<'_>) -> ([u8; 32], [u8; 32]) {
    let mut h = blake3::Hasher::new_derive_key("ferry/1 pairing transcript");
    let mut field = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(&b.ekm);
    field(b.server.as_bytes());
    field(b.client.as_bytes());
    field(b.server_name.as_bytes());
    field(b.client_name.as_bytes());
    field(b.client_msg);
    field(b.server_msg);
    let transcript = h.finalize();
    let kc = blake3::derive_key("ferry/1 pairing client confirmation", key);
    let ks = blake3::derive_key("ferry/1 pairing server confirmation", key);
    (
        *blake3::keyed_hash(&kc, transcript.as_bytes()).as_bytes(),
        *blake3::keyed_hash(&ks, transcript.as_bytes()).as_bytes(),
    )
}

pub(crate) fn start(code: &PairingCode) -> (Spake2<Ed25519Group>, Vec<u8>) {
    Spake2::<Ed25519Group>::start_symmetric(&code.password(), &SpakeIdentity::new(SPAKE_ID))
}

pub(crate) fn magic() -> u32 {
    MAGIC
}

/// Constant-time comparison of two MACs.
pub(crate) fn mac_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::Hash::from(*a) == blake3::Hash::from(*b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_format_round_trip() {
        for _ in 0..100 {
            let c = PairingCode::random().unwrap();
            let s = c.to_string();
            assert_eq!(s.len(), 9);
            assert_eq!(s.parse::<PairingCode>().unwrap(), c);
        }
        assert_eq!("0000 0042".parse::<PairingCode>().unwrap().as_u32(), 42);
        assert!("1234-567".parse::<PairingCode>().is_err());
        assert!("1234-567x".parse::<PairingCode>().is_err());
        assert!(PairingCode::from_u32(100_000_000).is_none());
    }

    #[test]
    fn spake_agrees_only_on_same_code() {
        let a = PairingCode::from_u32(12345678).unwrap();
        let b = PairingCode::from_u32(12345679).unwrap();
        let (sa, ma) = start(&a);
        let (sb, mb) = start(&a);
        assert_eq!(sa.finish(&mb).unwrap(), sb.finish(&ma).unwrap());
        let (sa, ma) = start(&a);
        let (sb, mb) = start(&b);
        assert_ne!(sa.finish(&mb).unwrap(), sb.finish(&ma).unwrap());
    }
}
