//! Local discovery, layered: mDNS (this module), tickets/QR ([`crate::ticket`]) and explicit
//! `host:port`; [`crate::doctor()`] explains which layer works on this network.
//!
//! The sender advertises `_ferry._udp.local.` with TXT `v=1`, a per-session random id and the
//! device name; no stable identifier is broadcast. The receiver browses and lists senders.
//!
//! Multicast scope: `mdns-sd` joins the mDNS group on every interface when its daemon starts,
//! *before* an interface restriction is applied, and only then stops using the disabled ones.
//! So [`MdnsInterfaces::Only`] restricts what is announced and queried, but a daemon must only
//! be started where joining the group on all interfaces is acceptable (the real device, or a
//! test network namespace). ferry's tests start it only inside namespaces they created.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The DNS-SD service type.
pub const SERVICE_TYPE: &str = "_ferry._udp.local.";
/// TXT protocol version.
pub const TXT_VERSION: &str = "1";

/// Error from a discovery mechanism.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The mDNS daemon failed.
    #[error("mDNS: {0}")]
    Mdns(#[from] mdns_sd::Error),
    /// Random session id generation failed.
    #[error("system random generator failed")]
    Rng,
    /// The advertisement is not valid (e.g. empty name).
    #[error("invalid advertisement: {0}")]
    Invalid(&'static str),
}

/// What a sender announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertisement {
    /// Device name shown to the receiver.
    pub name: String,
    /// QUIC port.
    pub port: u16,
    /// Addresses to announce; empty = every address of the enabled interfaces.
    pub addrs: Vec<IpAddr>,
}

/// A sender found on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredSender {
    /// Its device name.
    pub name: String,
    /// Per-session random id (changes every advertisement).
    pub session: String,
    /// Socket addresses to try (feed to `Endpoint::connect_*`).
    pub addrs: Vec<SocketAddr>,
}

/// How long a browse goes on after the first sender is found, so that every sender on the
/// network is in the answer: a receiver that saw only one of two would take it as the old
/// device and ask for its code. Responders answer a query within 20–120 ms (RFC 6762), but at
/// 300 ms a loaded machine missed the second of two senders once in eleven runs of the
/// namespace tests.
pub const BROWSE_SETTLE: Duration = Duration::from_millis(1000);

/// A way to announce a sender and find senders.
pub trait Discovery: Send + Sync {
    /// Starts announcing `ad` (replacing a previous announcement); returns the session id.
    fn advertise(&self, ad: &Advertisement) -> Result<String, DiscoveryError>;
    /// Stops announcing.
    fn stop_advertising(&self) -> Result<(), DiscoveryError>;
    /// Browses for up to `wait`, returning [`BROWSE_SETTLE`] after the first sender is found
    /// (or at `wait`), with every sender seen by then.
    fn browse(&self, wait: Duration) -> Result<Vec<DiscoveredSender>, DiscoveryError>;
}

/// One interface selector for [`MdnsInterfaces::Only`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MdnsInterface {
    /// By name, e.g. `wlan0`.
    Name(String),
    /// The interface holding this address.
    Addr(IpAddr),
    /// IPv4 loopback.
    LoopbackV4,
}

/// Which interfaces mDNS announces and queries on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MdnsInterfaces {
    /// Every interface (mdns-sd's default; loopback excluded).
    #[default]
    All,
    /// Only these.
    Only(Vec<MdnsInterface>),
}

/// mDNS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MdnsConfig {
    /// Interface restriction.
    pub interfaces: MdnsInterfaces,
    /// UDP port (5353 on real networks).
    pub port: u16,
}

impl Default for MdnsConfig {
    fn default() -> Self {
        Self {
            interfaces: MdnsInterfaces::All,
            port: 5353,
        }
    }
}

/// [`Discovery`] over mDNS / DNS-SD (`mdns-sd`).
pub struct MdnsDiscovery {
    daemon: mdns_sd::ServiceDaemon,
    advertised: Mutex<Option<String>>,
}

impl std::fmt::Debug for MdnsDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MdnsDiscovery").finish_non_exhaustive()
    }
}

/// A random 16-hex-digit session id.
pub(crate) fn session_id() -> Result<String, DiscoveryError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| DiscoveryError::Rng)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl MdnsDiscovery {
    /// Starts the mDNS daemon (see the module docs about multicast scope).
    pub fn new(config: &MdnsConfig) -> Result<Self, DiscoveryError> {
        let daemon = mdns_sd::ServiceDaemon::new_with_port(config.port)?;
        if let MdnsInterfaces::Only(list) = &config.interfaces {
            daemon.disable_interface(mdns_sd::IfKind::All)?;
            for i in list {
                let kind = match i {
                    MdnsInterface::Name(n) => mdns_sd::IfKind::Name(n.clone()),
                    MdnsInterface::Addr(a) => mdns_sd::IfKind::Addr(*a),
                    MdnsInterface::LoopbackV4 => mdns_sd::IfKind::LoopbackV4,
                };
                daemon.enable_interface(kind)?;
            }
        }
        Ok(Self {
            daemon,
            advertised: Mutex::new(None),
        })
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.advertised.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for MdnsDiscovery {
    fn drop(&mut self) {
        if let Some(full) = self.slot().take() {
            let _ = self.daemon.unregister(&full);
        }
        let _ = self.daemon.shutdown();
    }
}

impl Discovery for MdnsDiscovery {
    fn advertise(&self, ad: &Advertisement) -> Result<String, DiscoveryError> {
        if ad.name.trim().is_empty() {
            return Err(DiscoveryError::Invalid("empty name"));
        }
        self.stop_advertising()?;
        let session = session_id()?;
        let name: String = ad
            .name
            .chars()
            .filter(|c| !c.is_control())
            .take(64)
            .collect();
        let props = [
            ("v", TXT_VERSION),
            ("sid", session.as_str()),
            ("name", name.as_str()),
        ];
        let host = format!("ferry-{session}.local.");
        let info = mdns_sd::ServiceInfo::new(
            SERVICE_TYPE,
            &format!("ferry-{session}"),
            &host,
            &ad.addrs[..],
            ad.port,
            &props[..],
        )?;
        let info = if ad.addrs.is_empty() {
            info.enable_addr_auto()
        } else {
            info
        };
        let full = info.get_fullname().to_string();
        self.daemon.register(info)?;
        *self.slot() = Some(full);
        Ok(session)
    }

    fn stop_advertising(&self) -> Result<(), DiscoveryError> {
        if let Some(full) = self.slot().take() {
            self.daemon.unregister(&full)?;
        }
        Ok(())
    }

    fn browse(&self, wait: Duration) -> Result<Vec<DiscoveredSender>, DiscoveryError> {
        let rx = self.daemon.browse(SERVICE_TYPE)?;
        let deadline = Instant::now() + wait;
        let mut found: HashMap<String, DiscoveredSender> = HashMap::new();
        let mut settle: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let until = settle.map_or(deadline, |s| s.min(deadline));
            if now >= until {
                break;
            }
            let Ok(event) = rx.recv_timeout(until - now) else {
                continue;
            };
            if let mdns_sd::ServiceEvent::ServiceResolved(info) = event {
                if info.get_property_val_str("v") != Some(TXT_VERSION) {
                    continue;
                }
                let Some(session) = info.get_property_val_str("sid").map(str::to_string) else {
                    continue;
                };
                let name = info.get_property_val_str("name").unwrap_or("").to_string();
                let mut addrs: Vec<SocketAddr> = info
                    .get_addresses()
                    .iter()
                    .map(|a| SocketAddr::new(a.to_ip_addr(), info.port))
                    .collect();
                addrs.sort();
                let entry = found.entry(session.clone()).or_insert(DiscoveredSender {
                    name,
                    session,
                    addrs: Vec::new(),
                });
                for a in addrs {
                    if !entry.addrs.contains(&a) {
                        entry.addrs.push(a);
                    }
                }
                settle.get_or_insert(Instant::now() + BROWSE_SETTLE);
            }
        }
        let _ = self.daemon.stop_browse(SERVICE_TYPE);
        let mut out: Vec<_> = found.into_values().collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
