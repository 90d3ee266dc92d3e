//! Tickets: everything a receiver needs to reach and pair with a sender, as one string.
//!
//! `FERRY1` + base32 (RFC 4648, no padding) of a postcard-encoded private wire enum. Upper
//! case base32 fits the QR alphanumeric mode, so the QR code stays small. Parsing accepts
//! lower case and surrounding whitespace, is bounded by [`MAX_TICKET_LEN`], and never panics.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::identity::DeviceId;
use crate::pairing::PairingCode;

/// Prefix of every ticket string (protocol generation 1).
pub const TICKET_PREFIX: &str = "FERRY1";
/// Longest ticket string accepted.
pub const MAX_TICKET_LEN: usize = 2048;
const MAX_ADDRS: usize = 16;

/// Connection and pairing information for one sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// Candidate socket addresses of the sender.
    pub addrs: Vec<SocketAddr>,
    /// The sender's key id: the receiver pins it before the handshake.
    pub device_id: DeviceId,
    /// The sender's device name.
    pub name: String,
    /// The one-time pairing code.
    pub code: PairingCode,
}

/// Error parsing a [`Ticket`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TicketError {
    /// Longer than [`MAX_TICKET_LEN`].
    #[error("ticket too long")]
    TooLong,
    /// Missing the `FERRY1` prefix (not a ticket, or from an incompatible version).
    #[error("not a ferry ticket (expected prefix {TICKET_PREFIX})")]
    Prefix,
    /// Not valid base32.
    #[error("ticket is not valid base32 (truncated or mistyped?)")]
    Encoding,
    /// The payload does not decode (truncated, corrupt, or an unknown version).
    #[error("ticket payload is corrupt or from an unknown version")]
    Payload,
    /// The payload decoded but is not usable.
    #[error("ticket is invalid: {0}")]
    Invalid(&'static str),
}

#[derive(Serialize, Deserialize)]
enum TicketWireFormat {
    V1 {
        addrs: Vec<SocketAddr>,
        key: [u8; 32],
        name: String,
        code: u32,
    },
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wire = TicketWireFormat::V1 {
            addrs: self.addrs.iter().take(MAX_ADDRS).copied().collect(),
            key: *self.device_id.as_bytes(),
            name: self.name.clone(),
            code: self.code.as_u32(),
        };
        let bytes = postcard::to_allocvec(&wire).map_err(|_| fmt::Error)?;
        write!(
            f,
            "{TICKET_PREFIX}{}",
            data_encoding::BASE32_NOPAD.encode(&bytes)
        )
    }
}

impl FromStr for Ticket {
    type Err = TicketError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() > MAX_TICKET_LEN {
            return Err(TicketError::TooLong);
        }
        let upper = s.to_ascii_uppercase();
        let body = upper
            .strip_prefix(TICKET_PREFIX)
            .ok_or(TicketError::Prefix)?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.as_bytes())
            .map_err(|_| TicketError::Encoding)?;
        let (wire, rest): (TicketWireFormat, &[u8]) =
            postcard::take_from_bytes(&bytes).map_err(|_| TicketError::Payload)?;
        if !rest.is_empty() {
            return Err(TicketError::Payload);
        }
        match wire {
            TicketWireFormat::V1 {
                addrs,
                key,
                name,
                code,
            } => {
                if addrs.is_empty() {
                    return Err(TicketError::Invalid("no addresses"));
                }
                if addrs.len() > MAX_ADDRS {
                    return Err(TicketError::Invalid("too many addresses"));
                }
                if name.len() > crate::identity::MAX_DEVICE_NAME {
                    return Err(TicketError::Invalid("device name too long"));
                }
                let code = PairingCode::from_u32(code).ok_or(TicketError::Invalid("bad code"))?;
                Ok(Ticket {
                    addrs,
                    device_id: DeviceId::from_bytes(key),
                    name,
                    code,
                })
            }
        }
    }
}

impl Ticket {
    /// The ticket as a QR code drawn with Unicode half blocks, for a terminal.
    pub fn to_qr_unicode(&self) -> Result<String, qrcode::types::QrError> {
        let qr = qrcode::QrCode::with_error_correction_level(
            self.to_string().as_bytes(),
            qrcode::EcLevel::L,
        )?;
        Ok(qr
            .render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .build())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Ticket {
        Ticket {
            addrs: vec![
                "127.0.0.1:4433".parse().unwrap(),
                "[::1]:4433".parse().unwrap(),
            ],
            device_id: DeviceId::from_bytes([7; 32]),
            name: "Old phone".into(),
            code: PairingCode::from_u32(12_345_678).unwrap(),
        }
    }

    #[test]
    fn round_trip_and_case_insensitive() {
        let t = sample();
        let s = t.to_string();
        assert!(s.starts_with(TICKET_PREFIX));
        assert!(s.len() < 200, "{}", s.len());
        assert_eq!(s.parse::<Ticket>().unwrap(), t);
        assert_eq!(
            format!("  {}\n", s.to_lowercase())
                .parse::<Ticket>()
                .unwrap(),
            t
        );
        let qr = t.to_qr_unicode().unwrap();
        assert!(qr.lines().count() > 10);
    }

    /// The `ticket` fuzz harness on stable: the seeds, the committed corpus and regressions
    /// (`fuzz/`), and mutations of the seeds (one character replaced, cut, doubled).
    #[test]
    fn fuzz_harness_on_seeds_corpus_and_mutations() {
        let mut inputs = crate::fuzzing::seed_corpus();
        assert!(!inputs.is_empty());
        let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
        for kind in ["corpus", "regressions"] {
            if let Ok(rd) = std::fs::read_dir(fuzz.join(kind).join("ticket")) {
                for e in rd.flatten() {
                    inputs.push(std::fs::read(e.path()).unwrap());
                }
            }
        }
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567a=1 \xff";
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for seed in inputs {
            crate::fuzzing::ticket(&seed);
            for _ in 0..300 {
                let mut m = seed.clone();
                if m.is_empty() {
                    break;
                }
                match next(3) {
                    0 => {
                        let i = next(m.len());
                        m[i] = alphabet[next(alphabet.len())];
                    }
                    1 => m.truncate(next(m.len())),
                    _ => {
                        let i = next(m.len());
                        let piece = m[i..].to_vec();
                        m.extend_from_slice(&piece);
                    }
                }
                crate::fuzzing::ticket(&m);
            }
        }
    }

    /// Writes the ticket seeds to `fuzz/corpus/ticket/seed-<n>`:
    /// `cargo test -p ferry-transport --lib -- --ignored write_ticket_seed_corpus`.
    #[test]
    #[ignore]
    fn write_ticket_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/ticket");
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in crate::fuzzing::seed_corpus().into_iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
        }
    }

    #[test]
    fn garbage_is_rejected_without_panic() {
        let s = sample().to_string();
        assert_eq!("".parse::<Ticket>(), Err(TicketError::Prefix));
        assert_eq!("hello".parse::<Ticket>(), Err(TicketError::Prefix));
        assert_eq!("FERRY1!!!".parse::<Ticket>(), Err(TicketError::Encoding));
        assert_eq!(
            "x".repeat(5000).parse::<Ticket>(),
            Err(TicketError::TooLong)
        );
        // Every truncation fails cleanly.
        for n in 0..s.len() {
            assert!(s[..n].parse::<Ticket>().is_err(), "prefix {n} accepted");
        }
        // Trailing junk fails.
        assert!(format!("{s}AAAA").parse::<Ticket>().is_err());
        // Random base32 payloads never panic.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut bytes = Vec::new();
            for _ in 0..(x % 120) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            let t = format!(
                "{TICKET_PREFIX}{}",
                data_encoding::BASE32_NOPAD.encode(&bytes)
            );
            let _ = t.parse::<Ticket>();
        }
    }
}
