//! Fuzz harness for ticket parsing, shared by the cargo-fuzz target `ticket` (nightly) and the
//! proptest in `ticket.rs` (stable). Not part of the API.

use crate::ticket::Ticket;

/// Parses arbitrary bytes as a ticket: never panics, and an accepted ticket prints to a string
/// that parses back to the same ticket.
pub fn ticket(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = s.parse::<Ticket>() {
        let printed = t.to_string();
        assert_eq!(printed.parse::<Ticket>().as_ref(), Ok(&t), "{printed}");
    }
}

/// Ticket strings to start from.
pub fn seed_corpus() -> Vec<Vec<u8>> {
    use crate::identity::DeviceId;
    use crate::pairing::PairingCode;
    let mut out = Vec::new();
    for (addrs, name) in [
        (vec!["192.168.1.20:4433"], "old phone"),
        (
            vec!["[fe80::1]:50000", "10.0.0.2:1", "127.0.0.1:65535"],
            "Ana's 💻",
        ),
    ] {
        let (Some(code), Ok(addrs)) = (
            PairingCode::from_u32(123_456),
            addrs
                .iter()
                .map(|a| a.parse())
                .collect::<Result<Vec<_>, _>>(),
        ) else {
            continue;
        };
        let t = Ticket {
            addrs,
            device_id: DeviceId::from_bytes([7; 32]),
            name: name.into(),
            code,
        };
        out.push(t.to_string().into_bytes());
    }
    out
}
