//! `ferry doctor`: what the network looks like from here, and what to do about it.

use std::net::IpAddr;
use std::time::Duration;

use crate::discovery::{Advertisement, Discovery, MdnsConfig, MdnsDiscovery};

/// What to check.
#[derive(Debug, Clone)]
pub struct DoctorConfig {
    /// Run the mDNS self-test with these settings; `None` skips it (no daemon is started).
    pub mdns: Option<MdnsConfig>,
    /// How long the self-test browses for its own announcement.
    pub self_test_wait: Duration,
    /// The QUIC port in use, for firewall advice.
    pub quic_port: Option<u16>,
}

impl Default for DoctorConfig {
    fn default() -> Self {
        Self {
            mdns: Some(MdnsConfig::default()),
            self_test_wait: Duration::from_secs(2),
            quic_port: None,
        }
    }
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceReport {
    /// Interface name.
    pub name: String,
    /// Its addresses.
    pub addrs: Vec<IpAddr>,
    /// Operationally up.
    pub up: bool,
    /// Loopback.
    pub loopback: bool,
    /// Has the MULTICAST flag (`None` when the platform does not tell).
    pub multicast: Option<bool>,
}

/// Result of advertising and browsing for ourselves.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MdnsSelfTest {
    /// Not run.
    Skipped,
    /// Our own announcement came back: multicast works here.
    SawItself,
    /// Our own announcement did not come back within the wait: multicast is blocked.
    NotSeen,
    /// The daemon could not run.
    Failed(String),
}

/// The diagnosis.
#[derive(Debug, Clone)]
pub struct DoctorReport {
    /// Interfaces found.
    pub interfaces: Vec<InterfaceReport>,
    /// mDNS self-test outcome.
    pub mdns: MdnsSelfTest,
    /// Human advice, most important first.
    pub advice: Vec<String>,
}

fn multicast_flag(name: &str) -> Option<bool> {
    let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).ok()?;
    let v = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).ok()?;
    Some(v & 0x1000 != 0) // IFF_MULTICAST
}

/// Lists interfaces with their flags.
pub fn interfaces() -> std::io::Result<Vec<InterfaceReport>> {
    let mut out: Vec<InterfaceReport> = Vec::new();
    for i in if_addrs::get_if_addrs()? {
        let ip = i.ip();
        if let Some(r) = out.iter_mut().find(|r| r.name == i.name) {
            r.addrs.push(ip);
            continue;
        }
        out.push(InterfaceReport {
            multicast: multicast_flag(&i.name),
            up: i.is_oper_up(),
            loopback: i.is_loopback(),
            addrs: vec![ip],
            name: i.name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Runs the diagnosis (blocking for up to `self_test_wait`; use `spawn_blocking` from async).
pub fn doctor(config: &DoctorConfig) -> DoctorReport {
    let interfaces = interfaces().unwrap_or_default();
    let mdns = match &config.mdns {
        None => MdnsSelfTest::Skipped,
        Some(m) => self_test(m, config.self_test_wait),
    };
    let mut advice = Vec::new();
    let usable: Vec<_> = interfaces.iter().filter(|i| i.up && !i.loopback).collect();
    if usable.is_empty() {
        advice.push(
            "No network interface is up besides loopback: join the same Wi-Fi as the other \
             device, or connect to the other device's hotspot."
                .to_string(),
        );
    } else if usable.iter().all(|i| i.multicast == Some(false)) {
        advice.push(
            "No interface supports multicast, so automatic discovery cannot work: use the \
             ticket/QR code or type the other device's address."
                .to_string(),
        );
    }
    let wait = config.self_test_wait.as_secs_f32();
    match &mdns {
        MdnsSelfTest::NotSeen => advice.push(format!(
            "mDNS discovery failed: our own announcement did not come back within {wait:.1} s, \
             so multicast is blocked here (firewall, Wi-Fi client isolation, or VPN). Use the \
             ticket/QR code instead, or connect both devices to the other device's hotspot."
        )),
        MdnsSelfTest::Failed(e) => advice.push(format!(
            "mDNS could not start ({e}). Use the ticket/QR code instead."
        )),
        MdnsSelfTest::Skipped | MdnsSelfTest::SawItself => {}
    }
    if let Some(port) = config.quic_port {
        advice.push(format!(
            "If the other device still cannot connect, allow UDP port {port} in this device's \
             firewall."
        ));
    }
    DoctorReport {
        interfaces,
        mdns,
        advice,
    }
}

fn self_test(config: &MdnsConfig, wait: Duration) -> MdnsSelfTest {
    let d = match MdnsDiscovery::new(config) {
        Ok(d) => d,
        Err(e) => return MdnsSelfTest::Failed(e.to_string()),
    };
    let ad = Advertisement {
        name: "ferry-doctor".into(),
        port: 9,
        addrs: Vec::new(),
    };
    let session = match d.advertise(&ad) {
        Ok(s) => s,
        Err(e) => return MdnsSelfTest::Failed(e.to_string()),
    };
    match d.browse(wait) {
        Ok(found) if found.iter().any(|s| s.session == session) => MdnsSelfTest::SawItself,
        Ok(_) => MdnsSelfTest::NotSeen,
        Err(e) => MdnsSelfTest::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_include_loopback_and_skipped_self_test() {
        let r = doctor(&DoctorConfig {
            mdns: None,
            quic_port: Some(4433),
            ..Default::default()
        });
        let lo = r.interfaces.iter().find(|i| i.loopback).expect("loopback");
        assert!(lo.addrs.iter().any(|a| a.is_loopback()));
        assert_eq!(r.mdns, MdnsSelfTest::Skipped);
        assert!(r.advice.iter().any(|a| a.contains("UDP port 4433")));
    }
}
