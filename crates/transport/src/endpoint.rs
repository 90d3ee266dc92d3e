//! The QUIC endpoint: binds one UDP socket, serves and connects, admits only pinned keys or a
//! peer that completes pairing while a code is active.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quinn::VarInt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::identity::{sanitize_device_name, DeviceId, Identity};
use crate::pairing::{
    self, Binding, ClientMsg, HelloReply, PairingCode, PairingError, RejectReason, ServerMsg,
};
use crate::peers::{NotUsable, PeerRecord, PeerRole, PeerStore, DEFAULT_PAIRING_TTL};
use crate::ticket::Ticket;
use crate::tls::{self, TlsConfigError, SERVER_NAME};
use crate::{close, RecvStream, SendStream};

/// Congestion controller for bulk transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Congestion {
    /// CUBIC (RFC 8312). Loss-based: on Wi-Fi with random loss its rate collapses (measured
    /// with the `bulk` example through a lossy relay: ~1 MB/s at 1 % loss, 10 ms RTT).
    Cubic,
    /// BBR, the default: model-based, keeps its rate under random loss (~38 MB/s in the same
    /// setup). quinn marks its BBR as experimental; switch to `Cubic` if it misbehaves.
    #[default]
    Bbr,
    /// NewReno.
    NewReno,
}

/// Endpoint settings. `Default` suits a LAN bulk transfer.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Local UDP address to bind; port 0 picks one.
    pub bind: SocketAddr,
    /// Connection-level receive window once the peer is authenticated.
    pub conn_receive_window: u32,
    /// Connection-level receive window until the peer is authenticated (pinned key or completed
    /// pairing): all an unauthenticated peer may make us buffer. Session frames are at most
    /// 4 KiB; this is raised to `conn_receive_window` after authentication.
    pub preauth_receive_window: u32,
    /// Per-stream receive window.
    pub stream_receive_window: u32,
    /// Send buffer per connection.
    pub send_window: u64,
    /// Concurrent streams of each direction the peer may open once authenticated.
    pub max_streams: u32,
    /// Congestion controller.
    pub congestion: Congestion,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Idle timeout (a sleeping phone must survive it).
    pub idle_timeout: Duration,
    /// Budget for the TLS handshake + session/pairing handshake.
    pub handshake_timeout: Duration,
    /// Budget for the TLS handshake alone (server side): a client that has not completed it
    /// by then (e.g. one that sent only part of its ClientHello) is dropped and its slot freed.
    pub tls_handshake_timeout: Duration,
    /// How long an issued pairing code stays valid.
    pub pairing_code_ttl: Duration,
    /// Delay between starting attempts to successive candidate addresses.
    pub connect_stagger: Duration,
    /// Connections being handshaken at once on the server; more are refused.
    pub max_pending: usize,
    /// Connections being handshaken at once from one IP address; more are refused.
    pub max_pending_per_ip: usize,
    /// Once this many connections are being handshaken, a client whose address is not
    /// validated yet is sent a QUIC Retry first (it must prove it receives at its source
    /// address; a spoofer or a fire-and-forget flood never comes back). 0: always.
    pub retry_above_pending: usize,
    /// A pinned peer not used for this long needs a code again (a sold or lost old device
    /// cannot come back later). Checked when admitting (server) and when connecting (client).
    pub pairing_ttl: Duration,
    /// Serve only this device (`ferry send --to`): any other key is refused at admission, before
    /// pairing (so it cannot use the code either).
    pub serve_only: Option<DeviceId>,
    /// How failed pairing attempts slow down and pause the pairing window.
    pub pairing_limits: PairingLimits,
}

/// How the pairing window resists online code guessing. Every attempt that used up a code
/// without completing pairing (a wrong code, or an attempt abandoned after the code was taken)
/// is a failure.
///
/// - After the n-th failure in a row (n ≥ 2), no new code can be issued for
///   `backoff · 2^(n-2)` (1, 2, 4 s by default).
/// - After `pause_after` failures in a row, pairing is **paused**: no code can be issued for
///   `pause`, or until the user acts ([`Endpoint::resume_pairing`]). Each further failure pauses
///   it again. So an attacker gets at most `pause_after` guesses, then one per `pause`.
/// - Per source address (an IPv4 address, an IPv6 /64): after its k-th failure (k ≥ 2) the
///   address is barred for `addr_backoff · 2^(k-2)`, at most `addr_backoff_max`; a barred
///   address is told there is no code, and the active code stays valid for everyone else.
///   At most `max_addrs` addresses are remembered.
///
/// A successful pairing clears the failures in a row. Pinned peers are never affected.
#[derive(Debug, Clone)]
pub struct PairingLimits {
    /// Failures in a row that pause pairing.
    pub pause_after: u32,
    /// First global back-off (doubles with each failure in a row).
    pub backoff: Duration,
    /// How long pairing stays paused without user action.
    pub pause: Duration,
    /// First per-address back-off (doubles with each failure from that address).
    pub addr_backoff: Duration,
    /// Longest per-address back-off.
    pub addr_backoff_max: Duration,
    /// Addresses remembered at most.
    pub max_addrs: usize,
}

impl Default for PairingLimits {
    fn default() -> Self {
        Self {
            pause_after: 5,
            backoff: Duration::from_secs(1),
            pause: Duration::from_secs(600),
            addr_backoff: Duration::from_secs(4),
            addr_backoff_max: Duration::from_secs(3600),
            max_addrs: 1024,
        }
    }
}

/// The state of the pairing window's guessing defence ([`Endpoint::pairing_gate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairingGate {
    /// Failed pairing attempts in a row.
    pub failures: u32,
    /// Pairing is paused (too many failures in a row): it needs the user, or `retry_in`.
    pub paused: bool,
    /// Time until a new code can be issued (zero: now).
    pub retry_in: Duration,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            conn_receive_window: 16 << 20,
            preauth_receive_window: 64 << 10,
            stream_receive_window: 8 << 20,
            send_window: 64 << 20,
            max_streams: 256,
            congestion: Congestion::default(),
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(90),
            handshake_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(3),
            pairing_code_ttl: Duration::from_secs(600),
            connect_stagger: Duration::from_millis(150),
            max_pending: 32,
            max_pending_per_ip: 8,
            retry_above_pending: 4,
            pairing_ttl: DEFAULT_PAIRING_TTL,
            serve_only: None,
            pairing_limits: PairingLimits::default(),
        }
    }
}

/// Error binding an [`Endpoint`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The UDP socket could not be bound.
    #[error("bind {addr}: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// A configured value is out of range.
    #[error("invalid endpoint config: {0}")]
    Config(String),
}

/// Error accepting one incoming connection. The endpoint keeps running: call
/// [`Endpoint::accept`] again (except after [`AcceptError::EndpointClosed`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// The endpoint was closed.
    #[error("endpoint closed")]
    EndpointClosed,
    /// The QUIC/TLS handshake failed.
    #[error("handshake from {addr} failed: {source}")]
    Handshake {
        /// Remote address.
        addr: SocketAddr,
        /// The cause.
        source: quinn::ConnectionError,
    },
    /// An unknown key connected while no pairing code was active: closed, no streams.
    #[error("refused {device} from {addr}: not paired and no pairing code active")]
    NotAdmitted {
        /// The refused key.
        device: DeviceId,
        /// Remote address.
        addr: SocketAddr,
    },
    /// A key other than [`EndpointConfig::serve_only`] connected: closed, no streams.
    #[error("refused {device} from {addr}: this endpoint serves only another device")]
    NotServed {
        /// The refused key.
        device: DeviceId,
        /// Remote address.
        addr: SocketAddr,
    },
    /// Session handshake or pairing failed (e.g. wrong code: the code is burned).
    #[error("pairing/session with {addr} failed: {source}")]
    Pairing {
        /// Remote address.
        addr: SocketAddr,
        /// The cause.
        source: PairingError,
    },
}

/// Error connecting to a peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No candidate address was given (and none is remembered).
    #[error("no address to connect to")]
    NoAddresses,
    /// Not paired with that device, so it cannot be reached without a code.
    #[error("device {0} is not paired")]
    UnknownPeer(DeviceId),
    /// Paired with that device, but its pinned key may not be used to receive from it: paired
    /// in the other direction, by an older ferry, or expired.
    #[error("device {device} cannot be reached without a code: {reason}")]
    NotUsable {
        /// The device.
        device: DeviceId,
        /// Why.
        reason: NotUsable,
    },
    /// Every candidate failed; one entry per address.
    #[error("could not connect: {}", .0.iter().map(|(a, e)| format!("{a}: {e}")).collect::<Vec<_>>().join("; "))]
    AllFailed(Vec<(SocketAddr, String)>),
    /// The device answered but refused a new connection for now (it is busy handshaking
    /// with many others, such as earlier attempts of a receiver restarted again and again):
    /// worth trying again in a moment.
    #[error("the device refused a new connection for now (busy with other connection attempts): {}", .0.iter().map(|(a, e)| format!("{a}: {e}")).collect::<Vec<_>>().join("; "))]
    Refused(Vec<(SocketAddr, String)>),
    /// No candidate answered in time.
    #[error("connect timed out")]
    Timeout,
    /// The device that answered holds another key than the one pinned (or in the ticket).
    #[error("the device that answered is not the expected one: its key is {}, expected {expected}", .presented.map_or_else(|| "missing".to_string(), |d| d.to_string()))]
    WrongKey {
        /// The pinned key.
        expected: DeviceId,
        /// The key the connection actually authenticated, if any.
        presented: Option<DeviceId>,
    },
    /// Session handshake or pairing failed.
    #[error(transparent)]
    Pairing(#[from] PairingError),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
}

/// An authenticated peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its pinned key id.
    pub device_id: DeviceId,
    /// The name it announced.
    pub name: String,
    /// Where the connection came from / went to.
    pub addr: SocketAddr,
    /// Unix seconds when the pairing that admitted it was made (now, if it just paired).
    pub paired_at: u64,
    /// The role it was paired in: [`PeerRole::Receiver`] for a peer that connected to us,
    /// [`PeerRole::Sender`] for one we connected to.
    pub role: PeerRole,
}

/// An authenticated connection: the peer's key is pinned (and was just paired, or already was).
#[derive(Debug, Clone)]
pub struct PeerConnection {
    conn: quinn::Connection,
    peer: PeerInfo,
    newly_paired: bool,
}

impl PeerConnection {
    /// The peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
    /// Whether this connection completed pairing (rather than a pinned reconnect).
    pub fn newly_paired(&self) -> bool {
        self.newly_paired
    }
    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), quinn::ConnectionError> {
        self.conn.open_bi().await
    }
    /// Accepts a bidirectional stream opened by the peer.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), quinn::ConnectionError> {
        self.conn.accept_bi().await
    }
    /// Opens a unidirectional stream.
    pub async fn open_uni(&self) -> Result<SendStream, quinn::ConnectionError> {
        self.conn.open_uni().await
    }
    /// Accepts a unidirectional stream opened by the peer.
    pub async fn accept_uni(&self) -> Result<RecvStream, quinn::ConnectionError> {
        self.conn.accept_uni().await
    }
    /// Closes the connection with an application code (see [`crate::close`]) and reason.
    pub fn close(&self, code: u32, reason: &[u8]) {
        self.conn.close(VarInt::from_u32(code), reason);
    }
    /// Resolves when the connection is closed, with the reason.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
    }
    /// The underlying quinn connection (stats, RTT, datagrams).
    pub fn quinn(&self) -> &quinn::Connection {
        &self.conn
    }
}

struct ActiveCode {
    code: PairingCode,
    expires: Instant,
}

/// Failures from one source address.
struct Strikes {
    count: u32,
    barred_until: Instant,
}

/// The pairing window: the active code, and the guessing defence ([`PairingLimits`]).
struct Window {
    active: Option<ActiveCode>,
    /// Failures in a row (any address).
    failures: u32,
    /// No code may be issued before this.
    not_before: Instant,
    addrs: HashMap<IpAddr, Strikes>,
    /// Attempts that took a code and have no verdict yet: no new code is issued meanwhile,
    /// since that verdict may set a back-off (or a pause) the new code would skip.
    in_flight: u32,
}

/// How soon a code refused because an attempt is still running is asked for again.
const IN_FLIGHT_RECHECK: Duration = Duration::from_millis(200);

/// What per-address limits count as one address: an IPv4 address, or an IPv6 /64 (one host
/// can use a whole /64).
fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// `base · 2^exp`, saturating, at most `max`.
fn doubled(base: Duration, exp: u32, max: Duration) -> Duration {
    base.checked_mul(1u32 << exp.min(20))
        .unwrap_or(max)
        .min(max)
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            active: None,
            failures: 0,
            not_before: now,
            addrs: HashMap::new(),
            in_flight: 0,
        }
    }

    fn gate(&self, limits: &PairingLimits, now: Instant) -> PairingGate {
        PairingGate {
            failures: self.failures,
            paused: self.failures >= limits.pause_after && now < self.not_before,
            retry_in: self.not_before.saturating_duration_since(now),
        }
    }

    fn open(
        &mut self,
        code: PairingCode,
        ttl: Duration,
        limits: &PairingLimits,
        now: Instant,
    ) -> Result<(), PairingError> {
        let gate = self.gate(limits, now);
        if !gate.retry_in.is_zero() || self.in_flight > 0 {
            return Err(PairingError::Throttled {
                failures: gate.failures,
                paused: gate.paused,
                retry_in: gate.retry_in.max(IN_FLIGHT_RECHECK),
            });
        }
        self.active = Some(ActiveCode {
            code,
            expires: now + ttl,
        });
        Ok(())
    }

    fn is_open(&self, now: Instant) -> bool {
        matches!(&self.active, Some(a) if a.expires > now)
    }

    /// Takes (burns) the active code for an attempt from `ip`; `None` when there is none or
    /// `ip` is barred (then the code stays for others).
    fn take(&mut self, ip: IpAddr, now: Instant) -> Option<PairingCode> {
        if matches!(self.addrs.get(&addr_key(ip)), Some(s) if s.barred_until > now) {
            return None;
        }
        let code = self
            .active
            .take()
            .filter(|a| a.expires > now)
            .map(|a| a.code)?;
        self.in_flight = self.in_flight.saturating_add(1);
        Some(code)
    }

    fn failed(&mut self, ip: IpAddr, limits: &PairingLimits, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        self.in_flight = self.in_flight.saturating_sub(1);
        // No code is issued while an attempt runs; one set meanwhile anyway (a chosen code)
        // did not wait for this verdict's back-off: void it.
        self.active = None;
        let wait = if self.failures >= limits.pause_after {
            limits.pause
        } else if self.failures >= 2 {
            doubled(limits.backoff, self.failures - 2, limits.pause)
        } else {
            Duration::ZERO
        };
        self.not_before = self.not_before.max(now + wait);
        let key = addr_key(ip);
        if !self.addrs.contains_key(&key) && self.addrs.len() >= limits.max_addrs {
            self.addrs.retain(|_, s| s.barred_until > now);
            if self.addrs.len() >= limits.max_addrs {
                let soonest = self
                    .addrs
                    .iter()
                    .min_by_key(|(_, s)| s.barred_until)
                    .map(|(k, _)| *k);
                if let Some(k) = soonest {
                    self.addrs.remove(&k);
                }
            }
        }
        let s = self.addrs.entry(key).or_insert(Strikes {
            count: 0,
            barred_until: now,
        });
        s.count = s.count.saturating_add(1);
        if s.count >= 2 {
            s.barred_until =
                now + doubled(limits.addr_backoff, s.count - 2, limits.addr_backoff_max);
        }
    }

    fn succeeded(&mut self, ip: IpAddr) {
        self.failures = 0;
        self.in_flight = self.in_flight.saturating_sub(1);
        self.addrs.remove(&addr_key(ip));
    }

    fn resume(&mut self, now: Instant) {
        self.failures = 0;
        self.not_before = now;
    }
}

/// One pairing attempt that took the code: a failure unless marked done, also when the
/// session is cancelled (timeout, dropped connection).
struct Attempt<'a> {
    sh: &'a Shared,
    ip: IpAddr,
    done: bool,
}

impl Attempt<'_> {
    fn succeeded(mut self) {
        self.done = true;
        self.sh.window().succeeded(self.ip);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.done {
            let limits = &self.sh.config.pairing_limits;
            self.sh.window().failed(self.ip, limits, Instant::now());
        }
    }
}

/// The other device's key, stored during pairing before that device confirmed it stored ours
/// (the confirmed ending, see [`crate::pairing`]): removed again (an earlier pairing of the same
/// device restored) unless committed, also when the session is cancelled (timeout, dropped
/// connection).
struct PendingPin<'a> {
    peers: &'a PeerStore,
    written: Option<PeerRecord>,
    previous: Option<PeerRecord>,
}

impl<'a> PendingPin<'a> {
    fn write(peers: &'a PeerStore, record: PeerRecord) -> Result<Self, PairingError> {
        let previous = peers.swap(record.clone())?;
        Ok(Self {
            peers,
            written: Some(record),
            previous,
        })
    }

    /// The other side confirmed: keep the pin.
    fn commit(mut self) {
        self.written = None;
    }

    /// The other side did not confirm (`reason`): remove the pin; the error to report.
    fn abandon(mut self, reason: String) -> PairingError {
        let kept = match self.written.take() {
            Some(w) => self.peers.revert(&w, self.previous.take()).is_err(),
            None => false,
        };
        PairingError::Unconfirmed { reason, kept }
    }
}

impl Drop for PendingPin<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.written.take() {
            // Cancelled (timeout): best effort, nowhere to report a failure from here.
            let _ = self.peers.revert(&w, self.previous.take());
        }
    }
}

struct Shared {
    quinn: quinn::Endpoint,
    identity: Identity,
    peers: PeerStore,
    config: EndpointConfig,
    window: Mutex<Window>,
    client_transport: Arc<quinn::TransportConfig>,
}

impl Shared {
    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn window_open(&self) -> bool {
        self.window().is_open(Instant::now())
    }
    /// Takes (burns) the active code for an attempt from `addr`.
    fn take_code(&self, addr: SocketAddr) -> Option<(PairingCode, Attempt<'_>)> {
        let code = self.window().take(addr.ip(), Instant::now())?;
        Some((
            code,
            Attempt {
                sh: self,
                ip: addr.ip(),
                done: false,
            },
        ))
    }
}

/// A ferry QUIC endpoint (both server and client on one UDP socket).
pub struct Endpoint {
    shared: Arc<Shared>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Result<PeerConnection, AcceptError>>>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("device", &self.shared.identity.device_id())
            .field("local", &self.shared.quinn.local_addr().ok())
            .finish_non_exhaustive()
    }
}

fn transport(cfg: &EndpointConfig, initial_bidi: u32, initial_uni: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Until the peer is authenticated it may make us buffer `preauth_receive_window` bytes
    // at most (whatever the stream window); `raise_limits` opens the rest.
    t.receive_window(VarInt::from_u32(cfg.preauth_receive_window))
        .stream_receive_window(VarInt::from_u32(cfg.stream_receive_window))
        .send_window(cfg.send_window)
        .max_concurrent_bidi_streams(VarInt::from_u32(initial_bidi))
        .max_concurrent_uni_streams(VarInt::from_u32(initial_uni))
        .keep_alive_interval(Some(cfg.keep_alive))
        .max_idle_timeout(quinn::IdleTimeout::try_from(cfg.idle_timeout).ok());
    match cfg.congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
    };
    t
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Endpoint {
    /// Binds the endpoint. Must be called inside a tokio runtime.
    pub fn bind(
        identity: Identity,
        peers: PeerStore,
        config: EndpointConfig,
    ) -> Result<Self, BindError> {
        if config.max_pending == 0 || config.max_pending_per_ip == 0 {
            return Err(BindError::Config(
                "max_pending and max_pending_per_ip must be > 0".into(),
            ));
        }
        if config.preauth_receive_window > config.conn_receive_window {
            return Err(BindError::Config(
                "preauth_receive_window must not exceed conn_receive_window".into(),
            ));
        }
        // Unauthenticated peers get exactly one bidi stream (the session stream) and no uni
        // streams; the limits are raised once the peer is authenticated.
        let server_transport = Arc::new(transport(&config, 1, 0));
        let client_transport = Arc::new(transport(&config, 0, 0));
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(tls::server_crypto(&identity)?));
        server.transport_config(server_transport);
        server.migration(true);
        let socket =
            std::net::UdpSocket::bind(config.bind).map_err(|source| BindError::Socket {
                addr: config.bind,
                source,
            })?;
        // Stateless-reset key derived from the device key: a restarted sender (same identity,
        // same port) resets the receiver's stale connection at once instead of leaving it to
        // wait for the idle timeout, so a resumed migration starts within a round trip.
        let reset_key = {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(b"ferry stateless reset key v1");
            ctx.update(identity.private_key().secret_der());
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, ctx.finish().as_ref())
        };
        // The connection IDs must be recognisable by a restarted endpoint too: quinn's default
        // generator signs them with a random per-process key, and a packet whose connection ID
        // fails that check is dropped *without* a stateless reset, so the reset above never
        // happened and the receiver waited for its idle timeout. Key it from the device key.
        let cid_key = {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(b"ferry connection id key v1");
            ctx.update(identity.private_key().secret_der());
            let d = ctx.finish();
            let mut k = [0u8; 8];
            k.copy_from_slice(&d.as_ref()[..8]);
            u64::from_le_bytes(k)
        };
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let quinn = quinn::Endpoint::new(
            endpoint_config,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| BindError::Socket {
            addr: config.bind,
            source,
        })?;
        let (tx, rx) = mpsc::channel(16);
        let shared = Arc::new(Shared {
            quinn,
            identity,
            peers,
            config,
            window: Mutex::new(Window::new(Instant::now())),
            client_transport,
        });
        let accept_task = tokio::spawn(accept_loop(shared.clone(), tx));
        Ok(Self {
            shared,
            incoming: tokio::sync::Mutex::new(rx),
            accept_task,
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shared.quinn.local_addr()
    }

    /// Addresses a peer may reach us at: the bound address, or every up, non-loopback
    /// interface address of the bound family when bound to the unspecified address.
    pub fn candidate_addrs(&self) -> std::io::Result<Vec<SocketAddr>> {
        let local = self.local_addr()?;
        if !local.ip().is_unspecified() {
            return Ok(vec![local]);
        }
        let v6 = local.is_ipv6();
        let mut out: Vec<SocketAddr> = if_addrs::get_if_addrs()?
            .into_iter()
            .filter(|i| !i.is_loopback() && i.is_oper_up())
            .map(|i| i.ip())
            .filter(|ip| v6 || ip.is_ipv4())
            .filter(|ip| !matches!(ip, IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80))
            .map(|ip| SocketAddr::new(ip, local.port()))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// This device's identity.
    pub fn identity(&self) -> &Identity {
        &self.shared.identity
    }

    /// The pinned peers.
    pub fn peers(&self) -> &PeerStore {
        &self.shared.peers
    }

    /// The record of `device` if its pinned key may be used without a code in `role` now
    /// ([`PeerRole::Sender`]: we may connect to it and receive; [`PeerRole::Receiver`]: it may
    /// connect to us), under this endpoint's [`EndpointConfig::pairing_ttl`].
    pub fn usable(&self, device: &DeviceId, role: PeerRole) -> Result<PeerRecord, NotUsable> {
        self.shared
            .peers
            .usable(device, role, now_unix(), self.shared.config.pairing_ttl)
    }

    /// Opens the pairing window with a fresh one-time code (replacing any previous code). While
    /// it is active and unused, unknown keys may connect to attempt pairing; the first attempt
    /// burns it. After failed attempts this fails with [`PairingError::Throttled`] until the
    /// back-off or pause has passed ([`Endpoint::pairing_gate`], [`PairingLimits`]).
    pub fn issue_pairing_code(&self) -> Result<PairingCode, PairingError> {
        let code = PairingCode::random()?;
        self.set_pairing_code(code)?;
        Ok(code)
    }

    /// Opens the pairing window with a code chosen by the caller (`ferry send --code`). A chosen
    /// code is weaker than a random one: warn the user. Throttled like
    /// [`Endpoint::issue_pairing_code`].
    pub fn set_pairing_code(&self, code: PairingCode) -> Result<(), PairingError> {
        let sh = &self.shared;
        sh.window().open(
            code,
            sh.config.pairing_code_ttl,
            &sh.config.pairing_limits,
            Instant::now(),
        )
    }

    /// Closes the pairing window without using the code.
    pub fn revoke_pairing_code(&self) {
        self.shared.window().active = None;
    }

    /// Failed pairing attempts in a row, whether pairing is paused, and when a new code can be
    /// issued.
    pub fn pairing_gate(&self) -> PairingGate {
        self.shared
            .window()
            .gate(&self.shared.config.pairing_limits, Instant::now())
    }

    /// The user asked for a new code after a pause (they know the failed attempts were theirs,
    /// or want to try again anyway): clears the failures in a row and the global back-off.
    /// Addresses that failed repeatedly stay barred for their own back-off.
    pub fn resume_pairing(&self) {
        self.shared.window().resume(Instant::now());
    }

    /// Whether a pairing code is active and unused.
    pub fn pairing_open(&self) -> bool {
        self.shared.window_open()
    }

    /// A ticket for `code` carrying our candidate addresses, key id and name.
    pub fn ticket(&self, code: PairingCode) -> std::io::Result<Ticket> {
        Ok(Ticket {
            addrs: self.candidate_addrs()?,
            device_id: self.shared.identity.device_id(),
            name: self.shared.identity.name().to_string(),
            code,
        })
    }

    /// Waits for the next incoming connection to finish authentication (pinned key, or a
    /// completed pairing). Per-connection failures are returned as errors; keep calling.
    pub async fn accept(&self) -> Result<PeerConnection, AcceptError> {
        let mut rx = self.incoming.lock().await;
        rx.recv().await.unwrap_or(Err(AcceptError::EndpointClosed))
    }

    /// Connects using a ticket: pins the server key from the ticket and pairs with its code.
    pub async fn connect_ticket(&self, ticket: &Ticket) -> Result<PeerConnection, ConnectError> {
        self.connect_inner(&ticket.addrs, Some(ticket.device_id), Some(ticket.code))
            .await
    }

    /// Connects to any of `addrs` and pairs with a code typed by the user. The server's key is
    /// not known beforehand; pairing authenticates it.
    pub async fn connect_with_code(
        &self,
        addrs: &[SocketAddr],
        code: PairingCode,
    ) -> Result<PeerConnection, ConnectError> {
        self.connect_inner(addrs, None, Some(code)).await
    }

    /// Reconnects to a paired device by its pinned key alone. Empty `addrs` uses the addresses
    /// remembered in the peers file.
    pub async fn connect_peer(
        &self,
        device: DeviceId,
        addrs: &[SocketAddr],
    ) -> Result<PeerConnection, ConnectError> {
        let rec = self
            .usable(&device, PeerRole::Sender)
            .map_err(|reason| match reason {
                NotUsable::NotPaired => ConnectError::UnknownPeer(device),
                reason => ConnectError::NotUsable { device, reason },
            })?;
        let addrs = if addrs.is_empty() {
            rec.last_addrs
        } else {
            addrs.to_vec()
        };
        self.connect_inner(&addrs, Some(device), None).await
    }

    async fn connect_inner(
        &self,
        addrs: &[SocketAddr],
        expected: Option<DeviceId>,
        code: Option<PairingCode>,
    ) -> Result<PeerConnection, ConnectError> {
        if addrs.is_empty() {
            return Err(ConnectError::NoAddresses);
        }
        let sh = &self.shared;
        let mut client =
            quinn::ClientConfig::new(Arc::new(tls::client_crypto(&sh.identity, expected)?));
        client.transport_config(sh.client_transport.clone());
        let budget = sh.config.handshake_timeout;
        let (conn, addr) = tokio::time::timeout(budget, race(sh, &client, addrs, expected))
            .await
            .map_err(|_| ConnectError::Timeout)??;
        // The certificate verifier already refused any other key; check again on the
        // connection itself, so that no path around the verifier (a resumed session, a future
        // change of the TLS setup) can hand us an unexpected peer.
        if let Err(e) = check_pinned(&conn, expected) {
            conn.close(VarInt::from_u32(close::PROTOCOL_ERROR), b"unexpected key");
            return Err(e);
        }
        let result = tokio::time::timeout(budget, client_session(sh, &conn, code)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(PairingError::Timeout),
        };
        match result {
            Ok((peer_id, name, paired, paired_at)) => {
                let _ = sh.peers.note_use(&peer_id, addr, now_unix());
                raise_limits(&conn, &sh.config);
                Ok(PeerConnection {
                    conn,
                    peer: PeerInfo {
                        device_id: peer_id,
                        name,
                        addr,
                        paired_at,
                        role: PeerRole::Sender,
                    },
                    newly_paired: paired,
                })
            }
            Err(e) => {
                // Closed by the server before the session (e.g. `NOT_SERVED` at admission):
                // say what its close code means rather than "connection lost".
                let e = match e {
                    PairingError::Connection(_) => closed_by_peer(&conn).unwrap_or(e),
                    e => e,
                };
                let code = match e {
                    PairingError::WrongCode => close::PAIRING_FAILED,
                    PairingError::Timeout => close::TIMEOUT,
                    _ => close::PROTOCOL_ERROR,
                };
                conn.close(VarInt::from_u32(code), b"session failed");
                Err(e.into())
            }
        }
    }

    /// Stops accepting, closes all connections with `code`, and waits briefly for the peers
    /// to be told.
    pub async fn close(&self, code: u32, reason: &[u8]) {
        self.accept_task.abort();
        self.shared.quinn.close(VarInt::from_u32(code), reason);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.quinn.wait_idle()).await;
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// The key `conn` authenticated must be `expected` (when one is expected).
fn check_pinned(conn: &quinn::Connection, expected: Option<DeviceId>) -> Result<(), ConnectError> {
    let Some(expected) = expected else {
        return Ok(());
    };
    match tls::peer_device_id(conn) {
        Some(id) if id == expected => Ok(()),
        presented => Err(ConnectError::WrongKey {
            expected,
            presented,
        }),
    }
}

/// Once the peer is authenticated: the configured stream counts and the full receive window.
fn raise_limits(conn: &quinn::Connection, cfg: &EndpointConfig) {
    conn.set_receive_window(VarInt::from_u32(cfg.conn_receive_window));
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(cfg.max_streams));
    conn.set_max_concurrent_uni_streams(VarInt::from_u32(cfg.max_streams));
}

/// Happy-eyeballs: start an attempt per address, `stagger` apart; first TLS-authenticated
/// connection wins, the rest are closed.
/// Connects to the first of `addrs` that completes a handshake. When none does and a device
/// answered but its certificate was refused (its key is not the `expected` one), that is
/// [`ConnectError::WrongKey`]: another device is there, not a dead address.
async fn race(
    sh: &Shared,
    client: &quinn::ClientConfig,
    addrs: &[SocketAddr],
    expected: Option<DeviceId>,
) -> Result<(quinn::Connection, SocketAddr), ConnectError> {
    let mut set = JoinSet::new();
    let mut errors = Vec::new();
    for (i, addr) in addrs.iter().copied().enumerate() {
        let connecting = match sh.quinn.connect_with(client.clone(), addr, SERVER_NAME) {
            Ok(c) => c,
            Err(e) => {
                errors.push((addr, e.to_string()));
                continue;
            }
        };
        let delay = sh.config.connect_stagger * i as u32;
        set.spawn(async move {
            tokio::time::sleep(delay).await;
            (addr, connecting.await)
        });
    }
    let mut winner = None;
    let mut refused = false;
    let mut other_key = false;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((addr, Ok(conn))) => {
                winner = Some((conn, addr));
                break;
            }
            Ok((addr, Err(e))) => {
                refused |= matches!(&e, quinn::ConnectionError::ConnectionClosed(c)
                    if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED);
                // A TLS alert raised here: the certificate that answered was refused.
                other_key |= matches!(&e, quinn::ConnectionError::TransportError(t)
                    if (0x100..0x200).contains(&u64::from(t.code)));
                errors.push((addr, e.to_string()));
            }
            Err(e) => errors.push((SocketAddr::from(([0, 0, 0, 0], 0)), e.to_string())),
        }
    }
    set.abort_all();
    while let Some(joined) = set.join_next().await {
        if let Ok((_, Ok(loser))) = joined {
            loser.close(VarInt::from_u32(close::SUPERSEDED), b"another path won");
        }
    }
    winner.ok_or(match (refused, other_key, expected) {
        (true, _, _) => ConnectError::Refused(errors),
        (false, true, Some(expected)) => ConnectError::WrongKey {
            expected,
            presented: None,
        },
        _ => ConnectError::AllFailed(errors),
    })
}

async fn client_session(
    sh: &Shared,
    conn: &quinn::Connection,
    code: Option<PairingCode>,
) -> Result<(DeviceId, String, bool, u64), PairingError> {
    let server_id = tls::peer_device_id(conn)
        .ok_or_else(|| PairingError::Protocol("no server certificate".into()))?;
    let me = &sh.identity;
    let (mut send, mut recv) = conn.open_bi().await?;
    let spake = code.as_ref().map(pairing::start);
    let client_msg = spake.as_ref().map(|(_, m)| m.clone());
    pairing::write_frame(
        &mut send,
        &ClientMsg::Hello {
            magic: pairing::magic(),
            name: me.name().to_string(),
            pake: client_msg.clone(),
        },
    )
    .await?;
    let reply: ServerMsg = read_or_closed(conn, pairing::read_frame(&mut recv).await)?;
    let (server_name, reply) = match reply {
        ServerMsg::Hello { name, reply } => (name, reply),
        ServerMsg::Rejected(r) => return Err(r.into()),
        ServerMsg::Confirm(_) | ServerMsg::Paired => {
            return Err(PairingError::Protocol("expected hello".into()))
        }
    };
    // The transcript hashes the name exactly as received (what the server hashed); what is
    // stored and shown is its sanitised form.
    let shown_name = sanitize_device_name(&server_name);
    match (reply, spake, client_msg) {
        (HelloReply::Accepted, _, _) => {
            // The server says it knows us; we must know it too, as a sender we may use.
            let rec = sh
                .peers
                .usable(
                    &server_id,
                    PeerRole::Sender,
                    now_unix(),
                    sh.config.pairing_ttl,
                )
                .map_err(|_| PairingError::NotPaired)?;
            let _ = send.finish();
            Ok((server_id, shown_name, false, rec.paired_at))
        }
        (HelloReply::Pake(server_msg), Some((state, _)), Some(client_msg)) => {
            let key = state
                .finish(&server_msg)
                .map_err(|e| PairingError::Protocol(format!("spake2: {e:?}")))?;
            let binding = Binding {
                ekm: pairing::exporter(conn)?,
                server: server_id,
                client: me.device_id(),
                server_name: &server_name,
                client_name: me.name(),
                client_msg: &client_msg,
                server_msg: &server_msg,
            };
            let (mac_c, mac_s) = pairing::confirmations(&key, &binding);
            pairing::write_frame(&mut send, &ClientMsg::Confirm(mac_c)).await?;
            match read_or_closed(conn, pairing::read_frame(&mut recv).await)? {
                ServerMsg::Confirm(m) if pairing::mac_eq(&m, &mac_s) => {}
                ServerMsg::Confirm(_) => return Err(PairingError::WrongCode),
                ServerMsg::Rejected(r) => return Err(r.into()),
                ServerMsg::Hello { .. } | ServerMsg::Paired => {
                    return Err(PairingError::Protocol("expected confirm".into()))
                }
            }
            // The confirmed ending (module docs of `pairing`): the server pins us and says
            // so; we pin it and finish our stream, and succeed once the server has that.
            pairing::write_frame(&mut send, &ClientMsg::Done).await?;
            let unconfirmed = |reason: String| PairingError::Unconfirmed {
                reason,
                kept: false,
            };
            match read_or_closed(conn, pairing::read_frame(&mut recv).await) {
                Ok(ServerMsg::Paired) => {}
                Ok(ServerMsg::Rejected(r)) => return Err(r.into()),
                Ok(_) => return Err(PairingError::Protocol("expected paired".into())),
                Err(PairingError::Protocol(e)) => return Err(PairingError::Protocol(e)),
                Err(e) => return Err(unconfirmed(e.to_string())),
            }
            let now = now_unix();
            let pin = PendingPin::write(
                &sh.peers,
                PeerRecord::paired(
                    server_id,
                    shown_name.clone(),
                    Some(conn.remote_address()),
                    PeerRole::Sender,
                    now,
                ),
            )?;
            // Acknowledged by the server's QUIC stack: it reads the end of the stream even if
            // we close the connection right after.
            let acked = match send.finish() {
                Ok(()) => match send.stopped().await {
                    Ok(None) => Ok(()),
                    Ok(Some(code)) => Err(format!("it stopped the session stream (code {code})")),
                    Err(e) => {
                        Err(closed_by_peer(conn).map_or_else(|| e.to_string(), |p| p.to_string()))
                    }
                },
                Err(e) => Err(e.to_string()),
            };
            match acked {
                Ok(()) => {
                    pin.commit();
                    Ok((server_id, shown_name, true, now))
                }
                Err(reason) => Err(pin.abandon(reason)),
            }
        }
        (HelloReply::Pake(_), _, _) => Err(PairingError::Protocol("unsolicited pairing".into())),
    }
}

/// Prefers the peer's close code over a generic read failure.
fn read_or_closed<T>(
    conn: &quinn::Connection,
    r: Result<T, PairingError>,
) -> Result<T, PairingError> {
    r.map_err(|e| closed_by_peer(conn).unwrap_or(e))
}

/// The pairing error the peer's close code stands for, if it closed with one.
fn closed_by_peer(conn: &quinn::Connection) -> Option<PairingError> {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            close::pairing_error(u32::try_from(c.error_code.into_inner()).ok()?)
        }
        _ => None,
    }
}

/// Who may start a handshake: at most `max_pending` connections being handshaken (or
/// waiting for the application), at most `max_pending_per_ip` of them from one IP address.
struct Admission {
    global: Arc<Semaphore>,
    max_pending: usize,
    max_per_ip: usize,
    retry_above: usize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// What to do with an incoming connection attempt.
enum Admit {
    /// Handshake it, holding this slot until done.
    Slot(Slot),
    /// Validate its address first (QUIC Retry: stateless, costs the client one round trip).
    Retry,
    /// Refuse it (CONNECTION_REFUSED): too many pending, in all or from its address.
    Refuse,
}

/// One admitted handshake; frees its place (global and per address) when dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    admission: Arc<Admission>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.admission.per_ip();
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// The address a per-source cap applies to: IPv4-mapped IPv6 counts as the IPv4 address.
fn source_ip(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl Admission {
    fn new(cfg: &EndpointConfig) -> Arc<Self> {
        Arc::new(Self {
            global: Arc::new(Semaphore::new(cfg.max_pending)),
            max_pending: cfg.max_pending,
            max_per_ip: cfg.max_pending_per_ip,
            retry_above: cfg.retry_above_pending,
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    fn per_ip(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.per_ip.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending(&self) -> usize {
        self.max_pending
            .saturating_sub(self.global.available_permits())
    }

    /// `validated`: the client already proved it receives at `ip` (it echoed a Retry or
    /// NEW_TOKEN token). Spoofed or fire-and-forget attempts thus hold at most
    /// `retry_above` slots, for at most the TLS handshake timeout each.
    fn decide(self: &Arc<Self>, ip: IpAddr, validated: bool, may_retry: bool) -> Admit {
        if !validated && may_retry && self.pending() >= self.retry_above {
            return Admit::Retry;
        }
        let mut map = self.per_ip();
        let n = map.get(&ip).copied().unwrap_or(0);
        if n >= self.max_per_ip {
            return Admit::Refuse;
        }
        let Ok(permit) = self.global.clone().try_acquire_owned() else {
            return Admit::Refuse;
        };
        map.insert(ip, n + 1);
        Admit::Slot(Slot {
            _permit: permit,
            ip,
            admission: Arc::clone(self),
        })
    }
}

async fn accept_loop(sh: Arc<Shared>, tx: mpsc::Sender<Result<PeerConnection, AcceptError>>) {
    let admission = Admission::new(&sh.config);
    while let Some(incoming) = sh.quinn.accept().await {
        let ip = source_ip(incoming.remote_address());
        let slot = match admission.decide(
            ip,
            incoming.remote_address_validated(),
            incoming.may_retry(),
        ) {
            Admit::Slot(slot) => slot,
            Admit::Retry => {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            Admit::Refuse => {
                incoming.refuse();
                continue;
            }
        };
        let sh = sh.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            let deadline = tokio::time::Instant::now() + sh.config.handshake_timeout;
            let result =
                match tokio::time::timeout_at(deadline, admit(&sh, incoming, deadline)).await {
                    Ok(r) => r,
                    Err(_) => Err(Some(AcceptError::Pairing {
                        addr,
                        source: PairingError::Timeout,
                    })),
                };
            match result {
                Ok(c) => {
                    let _ = tx.send(Ok(c)).await;
                }
                Err(Some(e)) => {
                    let _ = tx.send(Err(e)).await;
                }
                Err(None) => {}
            }
            // Held until the application took the result: at most `max_pending` connections
            // are in flight or waiting; beyond that, new ones are refused.
            drop(slot);
        });
    }
}

/// `Err(None)`: the peer gave up before saying anything (e.g. a happy-eyeballs loser); not
/// worth reporting.
async fn admit(
    sh: &Shared,
    incoming: quinn::Incoming,
    deadline: tokio::time::Instant,
) -> Result<PeerConnection, Option<AcceptError>> {
    let addr = incoming.remote_address();
    let connecting = incoming
        .accept()
        .map_err(|source| Some(AcceptError::Handshake { addr, source }))?;
    // A client that does not finish TLS quickly (e.g. sent part of a ClientHello and
    // vanished) is dropped: dropping `connecting` closes the connection and frees the slot.
    let tls_deadline = deadline.min(tokio::time::Instant::now() + sh.config.tls_handshake_timeout);
    let conn = match tokio::time::timeout_at(tls_deadline, connecting).await {
        Ok(r) => r.map_err(|source| Some(AcceptError::Handshake { addr, source }))?,
        Err(_) => {
            return Err(Some(AcceptError::Handshake {
                addr,
                source: quinn::ConnectionError::TimedOut,
            }))
        }
    };
    let Some(client_id) = tls::peer_device_id(&conn) else {
        conn.close(
            VarInt::from_u32(close::PROTOCOL_ERROR),
            b"no client certificate",
        );
        return Err(Some(AcceptError::Handshake {
            addr,
            source: quinn::ConnectionError::LocallyClosed,
        }));
    };
    if sh.config.serve_only.is_some_and(|only| only != client_id) {
        conn.close(
            VarInt::from_u32(close::NOT_SERVED),
            b"serving another device",
        );
        return Err(Some(AcceptError::NotServed {
            device: client_id,
            addr,
        }));
    }
    // Re-read now: a peer forgotten (or paired) by another process meanwhile counts at once.
    // Only a peer paired as our receiver, and not expired, is admitted without a code.
    let pinned = sh
        .peers
        .usable(
            &client_id,
            PeerRole::Receiver,
            now_unix(),
            sh.config.pairing_ttl,
        )
        .ok();
    if pinned.is_none() && !sh.window_open() {
        conn.close(VarInt::from_u32(close::NOT_PAIRED), b"not paired");
        return Err(Some(AcceptError::NotAdmitted {
            device: client_id,
            addr,
        }));
    }
    let fail = |conn: &quinn::Connection, e: PairingError| {
        let code = match e {
            PairingError::WrongCode => close::PAIRING_FAILED,
            PairingError::NotPaired | PairingError::NoPairingCode => close::NOT_PAIRED,
            PairingError::NotServed => close::NOT_SERVED,
            PairingError::Timeout => close::TIMEOUT,
            _ => close::PROTOCOL_ERROR,
        };
        conn.close(VarInt::from_u32(code), b"session failed");
        Some(AcceptError::Pairing { addr, source: e })
    };
    let session = async {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return Err(None::<AcceptError>),
        };
        let hello: ClientMsg = match pairing::read_frame(&mut recv).await {
            Ok(m) => m,
            Err(e) => return Err(fail(&conn, e)),
        };
        let pinned_at = pinned.as_ref().map(|r| r.paired_at);
        match server_session(sh, &conn, client_id, pinned_at, hello, &mut send, &mut recv).await {
            Ok((name, paired, paired_at)) => {
                raise_limits(&conn, &sh.config);
                let _ = sh.peers.note_use(&client_id, addr, now_unix());
                Ok(PeerConnection {
                    conn: conn.clone(),
                    peer: PeerInfo {
                        device_id: client_id,
                        name,
                        addr,
                        paired_at,
                        role: PeerRole::Receiver,
                    },
                    newly_paired: paired,
                })
            }
            Err((e, reason)) => {
                if let Some(r) = reason {
                    let _ = pairing::write_frame(&mut send, &ServerMsg::Rejected(r)).await;
                    let _ = send.finish();
                    // Give the rejection a moment to arrive before the close discards it.
                    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
                }
                Err(fail(&conn, e))
            }
        }
    };
    match tokio::time::timeout_at(deadline, session).await {
        Ok(r) => r,
        Err(_) => Err(fail(&conn, PairingError::Timeout)),
    }
}

type SessionFail = (PairingError, Option<RejectReason>);

async fn server_session(
    sh: &Shared,
    conn: &quinn::Connection,
    client_id: DeviceId,
    pinned_at: Option<u64>,
    hello: ClientMsg,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(String, bool, u64), SessionFail> {
    let protocol = |m: &str| {
        (
            PairingError::Protocol(m.into()),
            Some(RejectReason::Protocol),
        )
    };
    let io = |e: PairingError| (e, None);
    let ClientMsg::Hello { magic, name, pake } = hello else {
        return Err(protocol("expected hello"));
    };
    if magic != pairing::magic() {
        return Err(protocol("bad magic/version"));
    }
    // Stored and shown sanitised; hashed into the transcript exactly as received.
    let client_name = sanitize_device_name(&name);
    let me = &sh.identity;
    let Some(client_msg) = pake else {
        let Some(paired_at) = pinned_at else {
            return Err((PairingError::NotPaired, Some(RejectReason::NotPaired)));
        };
        let reply = ServerMsg::Hello {
            name: me.name().to_string(),
            reply: HelloReply::Accepted,
        };
        pairing::write_frame(send, &reply).await.map_err(io)?;
        let _ = send.finish();
        return Ok((client_name, false, paired_at));
    };
    // Burn the code now: one online guess per code. From here on, anything but a completed
    // pairing counts as a failed attempt (back-off, pause).
    let Some((code, attempt)) = sh.take_code(conn.remote_address()) else {
        return Err((
            PairingError::NoPairingCode,
            Some(RejectReason::NoPairingCode),
        ));
    };
    let (state, server_msg) = pairing::start(&code);
    let reply = ServerMsg::Hello {
        name: me.name().to_string(),
        reply: HelloReply::Pake(server_msg.clone()),
    };
    pairing::write_frame(send, &reply).await.map_err(io)?;
    let key = state
        .finish(&client_msg)
        .map_err(|e| protocol(&format!("spake2: {e:?}")))?;
    let binding = Binding {
        ekm: pairing::exporter(conn).map_err(io)?,
        server: me.device_id(),
        client: client_id,
        server_name: me.name(),
        client_name: &name,
        client_msg: &client_msg,
        server_msg: &server_msg,
    };
    let (mac_c, mac_s) = pairing::confirmations(&key, &binding);
    match pairing::read_frame(recv).await.map_err(io)? {
        ClientMsg::Confirm(m) if pairing::mac_eq(&m, &mac_c) => {}
        ClientMsg::Confirm(_) => {
            return Err((PairingError::WrongCode, Some(RejectReason::WrongCode)))
        }
        _ => return Err(protocol("expected confirm")),
    }
    pairing::write_frame(send, &ServerMsg::Confirm(mac_s))
        .await
        .map_err(io)?;
    match pairing::read_frame(recv).await.map_err(io)? {
        ClientMsg::Done => {}
        _ => return Err(protocol("expected done")),
    }
    // The confirmed ending (module docs of `pairing`): pin the client, tell it, and succeed
    // only once it says it pinned us too (it finishes its stream, nothing more).
    let now = now_unix();
    let pin = PendingPin::write(
        &sh.peers,
        PeerRecord::paired(
            client_id,
            client_name.clone(),
            Some(conn.remote_address()),
            PeerRole::Receiver,
            now,
        ),
    )
    .map_err(io)?;
    let confirmed = async {
        pairing::write_frame(send, &ServerMsg::Paired)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        let mut rest = [0u8; 1];
        match recv.read(&mut rest).await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err("it sent more after its last message".to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    match confirmed.await {
        Ok(()) => {
            pin.commit();
            attempt.succeeded();
            Ok((client_name, true, now))
        }
        Err(reason) => Err((pin.abandon(reason), None)),
    }
}

#[cfg(test)]
mod admission_tests {
    use super::*;

    /// A quinn server with ferry's server transport and TLS, and a connected client (any
    /// server key accepted by the client: `expected` None).
    async fn raw_pair(
        cfg: &EndpointConfig,
    ) -> (
        Identity,
        quinn::Endpoint,
        quinn::Connection,
        quinn::Endpoint,
        quinn::Connection,
    ) {
        let server_id = Identity::generate("server").unwrap();
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(tls::server_crypto(&server_id).unwrap()));
        server.transport_config(Arc::new(transport(cfg, 1, 0)));
        let sep = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let client_id = Identity::generate("client").unwrap();
        let client =
            quinn::ClientConfig::new(Arc::new(tls::client_crypto(&client_id, None).unwrap()));
        let cep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = sep.local_addr().unwrap();
        let (s, c) = tokio::join!(
            async { sep.accept().await.unwrap().await.unwrap() },
            async {
                cep.connect_with(client, to, SERVER_NAME)
                    .unwrap()
                    .await
                    .unwrap()
            }
        );
        (server_id, sep, s, cep, c)
    }

    /// Until `raise_limits` (called once the peer is authenticated), a peer can make the
    /// endpoint buffer no more than `preauth_receive_window` bytes, even on a stream that is
    /// never read (as data queued behind a gap would be); then the full window opens.
    #[tokio::test]
    async fn unauthenticated_peer_is_held_to_the_preauth_window_until_raised() {
        let cfg = EndpointConfig::default();
        let (_id, _sep, sconn, _cep, cconn) = raw_pair(&cfg).await;
        let (mut send, _recv) = cconn.open_bi().await.unwrap();
        let total = 1usize << 20;
        let writer = tokio::spawn(async move {
            send.write_all(&vec![7u8; total]).await.unwrap();
            send
        });
        // The server takes the stream but never reads it.
        let (_ss, _sr) = sconn.accept_bi().await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            !writer.is_finished(),
            "1 MiB accepted before authentication"
        );
        let sent = cconn.stats().udp_tx.bytes;
        let bound = 2 * u64::from(cfg.preauth_receive_window) + (32 << 10);
        assert!(
            sent < bound,
            "{sent} bytes sent before authentication (bound {bound})"
        );
        raise_limits(&sconn, &cfg);
        // The whole 1 MiB now fits the peer's credit (writes wait for flow-control credit).
        let send = tokio::time::timeout(Duration::from_secs(20), writer)
            .await
            .expect("the raised window did not let the write through")
            .unwrap();
        drop(send);
    }

    /// The explicit post-handshake check refuses a connection whose authenticated key is not
    /// the expected one, whatever the TLS verifier decided (here it accepted any key).
    #[tokio::test]
    async fn check_pinned_refuses_a_connection_with_another_key() {
        let (server_id, _sep, _sconn, _cep, cconn) = raw_pair(&EndpointConfig::default()).await;
        let other = Identity::generate("other").unwrap().device_id();
        match check_pinned(&cconn, Some(other)) {
            Err(ConnectError::WrongKey {
                expected,
                presented,
            }) => {
                assert_eq!(expected, other);
                assert_eq!(presented, Some(server_id.device_id()));
            }
            r => panic!("{r:?}"),
        }
        check_pinned(&cconn, Some(server_id.device_id())).unwrap();
        check_pinned(&cconn, None).unwrap();
    }

    fn cfg(max_pending: usize, per_ip: usize, retry_above: usize) -> EndpointConfig {
        EndpointConfig {
            max_pending,
            max_pending_per_ip: per_ip,
            retry_above_pending: retry_above,
            ..EndpointConfig::default()
        }
    }

    #[test]
    fn admission_retries_unvalidated_above_the_threshold_and_caps_per_ip() {
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let adm = Admission::new(&cfg(6, 3, 2));
        let mut held = Vec::new();
        // Below the threshold, unvalidated attempts are admitted.
        for _ in 0..2 {
            match adm.decide(a, false, true) {
                Admit::Slot(s) => held.push(s),
                _ => panic!("not admitted"),
            }
        }
        // From then on they must validate their address first.
        assert!(matches!(adm.decide(a, false, true), Admit::Retry));
        assert!(matches!(adm.decide(b, false, true), Admit::Retry));
        // Validated ones are admitted up to the per-address cap...
        match adm.decide(a, true, false) {
            Admit::Slot(s) => held.push(s),
            _ => panic!("not admitted"),
        }
        assert!(matches!(adm.decide(a, true, false), Admit::Refuse));
        // ... and others up to the global cap.
        for _ in 0..3 {
            match adm.decide(b, true, false) {
                Admit::Slot(s) => held.push(s),
                _ => panic!("not admitted"),
            }
        }
        assert!(matches!(adm.decide(b, true, false), Admit::Refuse));
        assert_eq!(adm.pending(), 6);
        // Freed slots are counted back, per address too.
        held.truncate(1);
        assert_eq!(adm.pending(), 1);
        assert_eq!(adm.per_ip().get(&a), Some(&1));
        assert_eq!(adm.per_ip().get(&b), None);
        // IPv4-mapped IPv6 counts as the IPv4 address.
        assert_eq!(
            source_ip("[::ffff:127.0.0.2]:9".parse().unwrap()),
            source_ip("127.0.0.2:9".parse().unwrap())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Attempts from 100 addresses, as fast as codes are issued, with a clock that advances
    /// 100 ms per attempt: 5 attempts get a code, then pairing is paused; resuming allows more.
    #[test]
    fn wrong_codes_back_off_then_pause_and_bar_repeating_addresses() {
        let l = PairingLimits::default();
        let ttl = Duration::from_secs(600);
        let code = PairingCode::from_u32(1).unwrap();
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        let mut guesses = 0;
        let mut now = t0;
        for i in 0..100u32 {
            now += Duration::from_millis(100);
            let _ = w.open(code, ttl, &l, now);
            let from = ip(&format!("10.0.{}.{}", i / 200, i % 200 + 1));
            if w.take(from, now).is_some() {
                guesses += 1;
                w.failed(from, &l, now);
            }
        }
        assert_eq!(guesses, 5);
        let g = w.gate(&l, now);
        assert!(g.paused && g.failures == 5, "{g:?}");
        assert!(g.retry_in > Duration::from_secs(590), "{g:?}");
        assert!(matches!(
            w.open(code, ttl, &l, now),
            Err(PairingError::Throttled { paused: true, .. })
        ));
        // The pause ends by itself; the next failure pauses again at once.
        now += l.pause;
        w.open(code, ttl, &l, now).unwrap();
        assert!(w.take(ip("10.9.9.9"), now).is_some());
        w.failed(ip("10.9.9.9"), &l, now);
        assert!(w.gate(&l, now).paused);
        // The user resumes: a code at once.
        w.resume(now);
        w.open(code, ttl, &l, now).unwrap();
        assert!(!w.gate(&l, now).paused);
    }

    /// The race a loaded sender met: a new code was issued while an attempt that took the
    /// previous code was still running (another connection was refused meanwhile and the
    /// back-off said "now"), so the sixth guess got a verdict. No code is issued while an
    /// attempt runs, so guesses stay within the limit however the attempts interleave.
    #[test]
    fn no_code_is_issued_while_an_attempt_runs() {
        let l = PairingLimits::default();
        let ttl = Duration::from_secs(600);
        let code = PairingCode::from_u32(1).unwrap();
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        let mut now = t0;
        let mut verdicts = 0;
        for i in 0..100u32 {
            now += Duration::from_millis(100);
            let (a, b) = (
                ip(&format!("10.1.0.{}", i + 1)),
                ip(&format!("10.2.0.{}", i + 1)),
            );
            // A takes a code; while it runs, a new code is issued (when the gate allows).
            let _ = w.open(code, ttl, &l, now);
            let took_a = w.take(a, now).is_some();
            let _ = w.open(code, ttl, &l, now);
            // A's verdict; then B tries whatever code is left.
            if took_a {
                verdicts += 1;
                w.failed(a, &l, now);
            }
            if w.take(b, now).is_some() {
                verdicts += 1;
                w.failed(b, &l, now);
            }
        }
        assert_eq!(verdicts, 5, "guesses got verdicts beyond the limit");
        assert!(w.gate(&l, now).paused);
    }

    #[test]
    fn back_off_doubles_and_a_repeating_address_is_barred_without_burning_the_code() {
        let l = PairingLimits::default();
        let ttl = Duration::from_secs(600);
        let code = PairingCode::from_u32(1).unwrap();
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        let a = ip("192.168.1.7");
        // First failure: a new code at once, and the same address may try once more.
        w.open(code, ttl, &l, t0).unwrap();
        assert!(w.take(a, t0).is_some());
        w.failed(a, &l, t0);
        assert_eq!(w.gate(&l, t0).retry_in, Duration::ZERO);
        w.open(code, ttl, &l, t0).unwrap();
        assert!(w.take(a, t0).is_some());
        w.failed(a, &l, t0);
        // Second: 1 s global back-off, the address barred for 4 s.
        assert_eq!(w.gate(&l, t0).retry_in, Duration::from_secs(1));
        assert!(w.open(code, ttl, &l, t0).is_err());
        let t1 = t0 + Duration::from_secs(1);
        w.open(code, ttl, &l, t1).unwrap();
        assert!(w.take(a, t1).is_none(), "a barred address took the code");
        assert!(w.is_open(t1), "the barred attempt burned the code");
        // Another address of the same IPv6 /64 counts as the same one; another /64 does not.
        let v6a = ip("2001:db8:1:2::1");
        let v6b = ip("2001:db8:1:2:ffff::9");
        assert_eq!(addr_key(v6a), addr_key(v6b));
        assert_ne!(addr_key(v6a), addr_key(ip("2001:db8:1:3::1")));
        // Someone else pairs: the failures in a row are cleared.
        let b = ip("192.168.1.8");
        assert!(w.take(b, t1).is_some());
        w.succeeded(b);
        assert_eq!(w.gate(&l, t1).failures, 0);
        // The address stays barred for its own back-off, then may try again.
        w.open(code, ttl, &l, t1).unwrap();
        assert!(w.take(a, t1 + Duration::from_secs(2)).is_none());
        assert!(w.take(a, t0 + Duration::from_secs(4)).is_some());
    }

    #[test]
    fn remembered_addresses_are_bounded() {
        let l = PairingLimits {
            max_addrs: 8,
            ..PairingLimits::default()
        };
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        for i in 0..1000u32 {
            w.failed(IpAddr::from(i.to_be_bytes()), &l, t0);
            w.resume(t0);
        }
        assert!(w.addrs.len() <= 8);
    }
}

/// The confirmed ending of pairing, against a peer that stops right before confirming: the
/// side that got no confirmation reports [`PairingError::Unconfirmed`] and keeps no pin (an
/// earlier pairing of the same device is restored).
#[cfg(test)]
mod confirmation_tests {
    use super::*;

    const T: Duration = Duration::from_secs(20);

    fn loopback_endpoint(name: &str) -> Endpoint {
        let cfg = EndpointConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            ..EndpointConfig::default()
        };
        Endpoint::bind(
            Identity::generate(name).unwrap(),
            PeerStore::in_memory(),
            cfg,
        )
        .unwrap()
    }

    fn earlier(id: DeviceId, role: PeerRole) -> PeerRecord {
        PeerRecord::paired(id, "earlier".into(), None, role, 1_000)
    }

    /// A raw client: pairs with `code` up to the server's last message, then closes the
    /// connection instead of finishing its stream. Returns that last message.
    async fn client_that_never_confirms(
        id: &Identity,
        server: SocketAddr,
        code: PairingCode,
    ) -> ServerMsg {
        let mut client = quinn::ClientConfig::new(Arc::new(tls::client_crypto(id, None).unwrap()));
        client.transport_config(Arc::new(transport(&EndpointConfig::default(), 0, 0)));
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = ep
            .connect_with(client, server, SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let server_id = tls::peer_device_id(&conn).unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let (state, client_msg) = pairing::start(&code);
        let hello = ClientMsg::Hello {
            magic: pairing::magic(),
            name: id.name().to_string(),
            pake: Some(client_msg.clone()),
        };
        pairing::write_frame(&mut send, &hello).await.unwrap();
        let ServerMsg::Hello {
            name,
            reply: HelloReply::Pake(server_msg),
        } = pairing::read_frame(&mut recv).await.unwrap()
        else {
            panic!("no pairing hello");
        };
        let key = state.finish(&server_msg).unwrap();
        let binding = Binding {
            ekm: pairing::exporter(&conn).unwrap(),
            server: server_id,
            client: id.device_id(),
            server_name: &name,
            client_name: id.name(),
            client_msg: &client_msg,
            server_msg: &server_msg,
        };
        let (mac_c, mac_s) = pairing::confirmations(&key, &binding);
        pairing::write_frame(&mut send, &ClientMsg::Confirm(mac_c))
            .await
            .unwrap();
        assert!(matches!(
            pairing::read_frame(&mut recv).await.unwrap(),
            ServerMsg::Confirm(m) if pairing::mac_eq(&m, &mac_s)
        ));
        pairing::write_frame(&mut send, &ClientMsg::Done)
            .await
            .unwrap();
        let last = pairing::read_frame(&mut recv).await.unwrap();
        // Closed before `send` is dropped (a drop would finish the stream: the confirmation).
        conn.close(VarInt::from_u32(close::COMPLETE), b"gone");
        last
    }

    /// A raw server on ferry's TLS: pairs with `code` up to its `Paired`, then stops reading
    /// (the client's confirmation never counts) and waits for the client to give up.
    async fn server_that_never_reads_the_confirmation(
        id: Identity,
        code: PairingCode,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(tls::server_crypto(&id).unwrap()));
        server.transport_config(Arc::new(transport(&EndpointConfig::default(), 1, 0)));
        let ep = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = ep.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let conn = ep.accept().await.unwrap().await.unwrap();
            let client_id = tls::peer_device_id(&conn).unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let ClientMsg::Hello {
                name,
                pake: Some(client_msg),
                ..
            } = pairing::read_frame(&mut recv).await.unwrap()
            else {
                panic!("no pairing hello");
            };
            let (state, server_msg) = pairing::start(&code);
            let reply = ServerMsg::Hello {
                name: id.name().to_string(),
                reply: HelloReply::Pake(server_msg.clone()),
            };
            pairing::write_frame(&mut send, &reply).await.unwrap();
            let key = state.finish(&client_msg).unwrap();
            let binding = Binding {
                ekm: pairing::exporter(&conn).unwrap(),
                server: id.device_id(),
                client: client_id,
                server_name: id.name(),
                client_name: &name,
                client_msg: &client_msg,
                server_msg: &server_msg,
            };
            let (mac_c, mac_s) = pairing::confirmations(&key, &binding);
            assert!(matches!(
                pairing::read_frame(&mut recv).await.unwrap(),
                ClientMsg::Confirm(m) if pairing::mac_eq(&m, &mac_c)
            ));
            pairing::write_frame(&mut send, &ServerMsg::Confirm(mac_s))
                .await
                .unwrap();
            assert!(matches!(
                pairing::read_frame(&mut recv).await.unwrap(),
                ClientMsg::Done
            ));
            pairing::write_frame(&mut send, &ServerMsg::Paired)
                .await
                .unwrap();
            let _ = recv.stop(VarInt::from_u32(0));
            let _ = tokio::time::timeout(T, conn.closed()).await;
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_client_that_vanishes_before_confirming_leaves_the_server_without_its_pin() {
        for previous in [None, Some(())] {
            let server = loopback_endpoint("old");
            let client = Identity::generate("new").unwrap();
            let cid = client.device_id();
            let before = previous.map(|()| earlier(cid, PeerRole::Receiver));
            if let Some(rec) = &before {
                server.peers().upsert(rec.clone()).unwrap();
            }
            let code = server.issue_pairing_code().unwrap();
            let to = server.local_addr().unwrap();
            let (s, last) = tokio::time::timeout(T, async {
                tokio::join!(
                    server.accept(),
                    client_that_never_confirms(&client, to, code)
                )
            })
            .await
            .expect("timed out");
            assert!(matches!(last, ServerMsg::Paired), "{last:?}");
            assert!(
                matches!(
                    &s,
                    Err(AcceptError::Pairing {
                        source: PairingError::Unconfirmed { kept: false, .. },
                        ..
                    })
                ),
                "{s:?}"
            );
            assert_eq!(
                server.peers().get(&cid),
                before,
                "the server kept a half pin"
            );
            // It counts as a failed attempt (the code was used).
            assert_eq!(server.pairing_gate().failures, 1);
        }
    }

    #[tokio::test]
    async fn a_server_that_never_takes_the_confirmation_leaves_the_client_without_its_pin() {
        for previous in [None, Some(())] {
            let client = loopback_endpoint("new");
            let server_id = Identity::generate("old").unwrap();
            let sid = server_id.device_id();
            let before = previous.map(|()| earlier(sid, PeerRole::Sender));
            if let Some(rec) = &before {
                client.peers().upsert(rec.clone()).unwrap();
            }
            let code = PairingCode::random().unwrap();
            let (to, task) = server_that_never_reads_the_confirmation(server_id, code).await;
            let c = tokio::time::timeout(T, client.connect_with_code(&[to], code))
                .await
                .expect("timed out");
            assert!(
                matches!(
                    &c,
                    Err(ConnectError::Pairing(PairingError::Unconfirmed {
                        kept: false,
                        ..
                    }))
                ),
                "{c:?}"
            );
            assert_eq!(
                client.peers().get(&sid),
                before,
                "the client kept a half pin"
            );
            tokio::time::timeout(T, task).await.unwrap().unwrap();
        }
    }
}
