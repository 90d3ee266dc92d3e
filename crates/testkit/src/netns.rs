//! Throwaway network namespaces for tests (Linux, root, `ip` from iproute2).
//!
//! [`Lab::new`] builds `n` host namespaces joined by a bridge that lives in its own hub
//! namespace, so nothing is created in (or routed through) the host's namespace:
//!
//! ```text
//!   <lab>-h0: eth0 10.77.1.1/24 ─┐
//!   <lab>-h1: eth0 10.77.1.2/24 ─┼─ <lab>-hub: br0 (vh0, vh1, ...)
//! ```
//!
//! Names are unique per process and lab; [`Drop`] deletes every namespace (which removes the
//! veths and the bridge), also when the test panics. The 10.77.1.0/24 subnet exists only
//! inside these namespaces. Run code inside a host with [`Lab::command`] (`ip netns exec`).
//!
//! Link conditions, per host (all removed with the namespaces):
//! - [`Lab::set_rate`]: `tc tbf` on both ends of the host's veth (its upload and its download);
//! - [`Lab::set_loss`]: random loss of incoming packets with `iptables -m statistic` (set it on
//!   both hosts for loss in both directions);
//! - [`Lab::blackout`] / [`Lab::link_down`]: every packet to and from the host dropped
//!   (firewall rules; like Wi-Fi out of range), or its bridge port down (carrier lost); both
//!   return a guard that restores the link on drop;
//! - [`Lab::move_addr`]: the host moves to a new address (new one added, old one removed), as
//!   when a phone gets a new DHCP lease.
//!
//! `tc netem` does not exist on the kernels this runs on; for delay, jitter and reordering use
//! the user-space [`crate::udp_proxy`].

use std::io;
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Why namespace tests cannot run here, if they cannot (not root, no `ip`, no netns support).
pub fn skip_reason() -> Option<String> {
    #[cfg(not(target_os = "linux"))]
    return Some("network namespaces need Linux".into());
    #[cfg(target_os = "linux")]
    {
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            });
        if uid.as_deref() != Some("0") {
            return Some("not root: network namespace tests skipped".into());
        }
        match Command::new("ip").arg("-V").output() {
            Ok(o) if o.status.success() => None,
            _ => Some("`ip` (iproute2) not found: network namespace tests skipped".into()),
        }
    }
}

/// Whether a program is on PATH (e.g. `iptables`).
pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// One host namespace.
#[derive(Debug, Clone)]
pub struct Host {
    /// Namespace name.
    pub ns: String,
    /// Its interface (always `eth0`).
    pub ifname: String,
    /// Its address on the lab subnet.
    pub addr: Ipv4Addr,
}

/// A set of namespaces on one bridge. Deleted on drop.
#[derive(Debug)]
pub struct Lab {
    hub: String,
    /// The hosts, in creation order.
    pub hosts: Vec<Host>,
    created: Vec<String>,
}

impl Lab {
    /// Creates `n` hosts (`n <= 200`) on a fresh bridge.
    pub fn new(n: usize) -> io::Result<Self> {
        if n > 200 {
            return Err(io::Error::other("too many hosts"));
        }
        let id = format!(
            "ferry{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let hub = format!("{id}-hub");
        let mut lab = Lab {
            hub: hub.clone(),
            hosts: Vec::new(),
            created: Vec::new(),
        };
        ip(&["netns", "add", &hub])?;
        lab.created.push(hub.clone());
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("{id}-h{i}");
            ip(&["netns", "add", &ns])?;
            lab.created.push(ns.clone());
            let vh = format!("vh{i}");
            ip(&[
                "-n", &hub, "link", "add", &vh, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &hub, "link", "set", &vh, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &vh, "up"])?;
            let addr = Ipv4Addr::new(10, 77, 1, (i + 1) as u8);
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])?;
            lab.hosts.push(Host {
                ns,
                ifname: "eth0".into(),
                addr,
            });
        }
        Ok(lab)
    }

    /// Namespace of host `i`; an error (not a panic) for an unknown host.
    fn host_ns(&self, i: usize) -> io::Result<&Host> {
        self.hosts
            .get(i)
            .ok_or_else(|| io::Error::other(format!("no host {i} in this lab")))
    }

    /// Limits host `i`'s link to `rate` (tc syntax, e.g. `100mbit`, `1gbit`) in both
    /// directions: a token bucket on its own `eth0` (upload) and on its bridge port (download).
    /// The bucket holds 10 ms of traffic (at least 64 KiB, like a switch port's buffer) and
    /// drops what waits longer than 20 ms. Replaces an earlier limit.
    pub fn set_rate(&self, i: usize, rate: &str) -> io::Result<()> {
        let h = self.host_ns(i)?;
        let bits = parse_rate(rate)?;
        let burst = ((bits / 8 / 100).max(64 * 1024)).to_string();
        for (ns, dev) in [
            (h.ns.as_str(), "eth0"),
            (self.hub.as_str(), &*format!("vh{i}")),
        ] {
            ip_tool(
                "tc",
                &[
                    "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst",
                    &burst, "latency", "20ms",
                ],
            )?;
        }
        Ok(())
    }

    /// Drops packets arriving at host `i` with probability `p` (0 removes the loss), TCP and
    /// UDP alike, so a TCP baseline sees the same link. Independent per packet (`iptables -m
    /// statistic --mode random`, in a chain of its own).
    pub fn set_loss(&self, i: usize, p: f64) -> io::Result<()> {
        let h = self.host_ns(i)?;
        if !(0.0..=1.0).contains(&p) {
            return Err(io::Error::other(format!("loss {p} is not a probability")));
        }
        ensure_chain(&h.ns, LOSS_CHAIN, &["INPUT"])?;
        Self::run_in(&h.ns, &["iptables", "-F", LOSS_CHAIN])?;
        if p > 0.0 {
            let p = format!("{p:.6}");
            Self::run_in(
                &h.ns,
                &[
                    "iptables",
                    "-A",
                    LOSS_CHAIN,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ],
            )?;
        }
        Ok(())
    }

    /// Drops every packet to and from host `i` until the guard is dropped (or
    /// [`Blackout::end`]). The interface stays up, as when a device walks out of Wi-Fi range:
    /// senders see no error, packets just vanish.
    pub fn blackout(&self, i: usize) -> io::Result<Blackout> {
        let h = self.host_ns(i)?;
        ensure_chain(&h.ns, BLACKOUT_CHAIN, &["INPUT", "OUTPUT"])?;
        Self::run_in(&h.ns, &["iptables", "-F", BLACKOUT_CHAIN])?;
        Self::run_in(&h.ns, &["iptables", "-A", BLACKOUT_CHAIN, "-j", "DROP"])?;
        Ok(Blackout {
            ns: h.ns.clone(),
            how: Restore::Flush,
        })
    }

    /// Takes host `i`'s bridge port down (its `eth0` loses carrier) until the guard is dropped.
    pub fn link_down(&self, i: usize) -> io::Result<Blackout> {
        self.host_ns(i)?;
        let port = format!("vh{i}");
        ip(&["-n", &self.hub, "link", "set", &port, "down"])?;
        Ok(Blackout {
            ns: self.hub.clone(),
            how: Restore::LinkUp(port),
        })
    }

    /// Moves host `i` to `new` (same /24): the new address is added, then the old one removed,
    /// so sockets bound to the old address break and new packets leave from the new one.
    pub fn move_addr(&mut self, i: usize, new: Ipv4Addr) -> io::Result<()> {
        let h = self.host_ns(i)?.clone();
        // Keep the new address when the old (primary) one goes away.
        Self::run_in(
            &h.ns,
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.conf.eth0.promote_secondaries=1",
            ],
        )?;
        ip(&[
            "-n",
            &h.ns,
            "addr",
            "add",
            &format!("{new}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &h.ns,
            "addr",
            "del",
            &format!("{}/24", h.addr),
            "dev",
            "eth0",
        ])?;
        if let Some(host) = self.hosts.get_mut(i) {
            host.addr = new;
        }
        Ok(())
    }

    /// The hub namespace (holds the bridge).
    pub fn hub(&self) -> &str {
        &self.hub
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.arg("netns").arg("exec").arg(ns).arg(program);
        c
    }

    /// Runs `cmd` (program + args) inside `ns` and returns its output; fails on non-zero exit.
    pub fn run_in(ns: &str, cmd: &[&str]) -> io::Result<Output> {
        let (prog, args) = cmd
            .split_first()
            .ok_or_else(|| io::Error::other("empty command"))?;
        let out = Self::command(ns, prog).args(args).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{} in {ns}: {}",
                cmd.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(out)
    }
}

const LOSS_CHAIN: &str = "FERRY_LOSS";
const BLACKOUT_CHAIN: &str = "FERRY_BLACKOUT";

/// Creates `chain` in `ns` (once) and jumps to it first from each of `from`.
fn ensure_chain(ns: &str, chain: &str, from: &[&str]) -> io::Result<()> {
    if Lab::run_in(ns, &["iptables", "-n", "-L", chain]).is_ok() {
        return Ok(());
    }
    Lab::run_in(ns, &["iptables", "-N", chain])?;
    for f in from {
        Lab::run_in(ns, &["iptables", "-I", f, "1", "-j", chain])?;
    }
    Ok(())
}

/// Bits per second of a tc rate (`100mbit`, `1gbit`, `500kbit`, `1000bit`).
pub fn parse_rate(rate: &str) -> io::Result<u64> {
    let r = rate.trim().to_ascii_lowercase();
    let (num, mul) = if let Some(n) = r.strip_suffix("gbit") {
        (n, 1_000_000_000u64)
    } else if let Some(n) = r.strip_suffix("mbit") {
        (n, 1_000_000)
    } else if let Some(n) = r.strip_suffix("kbit") {
        (n, 1_000)
    } else if let Some(n) = r.strip_suffix("bit") {
        (n, 1)
    } else {
        return Err(io::Error::other(format!("rate {rate:?}: use e.g. 100mbit")));
    };
    let n: f64 = num
        .parse()
        .map_err(|_| io::Error::other(format!("rate {rate:?}: not a number")))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(io::Error::other(format!("rate {rate:?}: must be positive")));
    }
    Ok((n * mul as f64) as u64)
}

fn ip_tool(tool: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(tool).args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    ip_tool("ip", args)
}

#[derive(Debug)]
enum Restore {
    Flush,
    LinkUp(String),
}

/// An interrupted link (see [`Lab::blackout`], [`Lab::link_down`]); restored on drop.
#[derive(Debug)]
#[must_use = "the link comes back when this guard is dropped"]
pub struct Blackout {
    ns: String,
    how: Restore,
}

impl Blackout {
    /// Restores the link now, reporting a failure (drop would ignore it).
    pub fn end(mut self) -> io::Result<()> {
        let r = self.restore();
        self.ns.clear();
        r
    }

    fn restore(&self) -> io::Result<()> {
        if self.ns.is_empty() {
            return Ok(());
        }
        match &self.how {
            Restore::Flush => Lab::run_in(&self.ns, &["iptables", "-F", BLACKOUT_CHAIN]).map(drop),
            Restore::LinkUp(port) => ip(&["-n", &self.ns, "link", "set", port, "up"]),
        }
    }
}

impl Drop for Blackout {
    fn drop(&mut self) {
        let _ = self.restore();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a TCP connection from host `from` to `addr:port` succeeds within a second.
    fn reach(from: &str, addr: Ipv4Addr, port: u16) -> bool {
        Lab::command(from, "nc")
            .args(["-z", "-w", "1", &addr.to_string(), &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A TCP listener inside `ns` (accepts repeatedly), killed on drop.
    struct Listener(std::process::Child);
    impl Drop for Listener {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn link_conditions_apply_and_everything_is_removed() {
        if let Some(reason) = skip_reason() {
            println!("SKIP link_conditions_apply_and_everything_is_removed: {reason}");
            return;
        }
        for tool in ["iptables", "tc", "nc"] {
            if !have(tool) {
                println!("SKIP link_conditions_apply_and_everything_is_removed: no {tool}");
                return;
            }
        }
        let mut lab = Lab::new(3).unwrap();
        let names: Vec<String> = lab.created.clone();
        let (a, b) = (lab.hosts[0].ns.clone(), lab.hosts[1].clone());
        let start_listener = |addr: Ipv4Addr| {
            let l = Listener(
                Lab::command(&b.ns, "nc")
                    .args(["-l", "-k", &addr.to_string(), "9000"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            let t = std::time::Instant::now();
            while !reach(&a, addr, 9000) {
                std::thread::sleep(std::time::Duration::from_millis(20));
                assert!(
                    t.elapsed() < std::time::Duration::from_secs(5),
                    "listener never came up"
                );
            }
            l
        };
        let l = start_listener(b.addr);
        lab.set_rate(1, "10mbit").unwrap();
        let qdisc = Lab::run_in(&b.ns, &["tc", "qdisc", "show", "dev", "eth0"]).unwrap();
        assert!(String::from_utf8_lossy(&qdisc.stdout).contains("tbf"));
        assert!(parse_rate("bogus").is_err());

        lab.set_loss(1, 1.0).unwrap();
        assert!(
            !reach(&a, b.addr, 9000),
            "100% loss let a connection through"
        );
        lab.set_loss(1, 0.0).unwrap();
        assert!(reach(&a, b.addr, 9000));
        assert!(lab.set_loss(1, 2.0).is_err());

        let cut = lab.blackout(1).unwrap();
        assert!(!reach(&a, b.addr, 9000), "reachable during a blackout");
        cut.end().unwrap();
        assert!(reach(&a, b.addr, 9000), "not reachable after the blackout");

        {
            let _down = lab.link_down(1).unwrap();
            assert!(!reach(&a, b.addr, 9000), "reachable with the link down");
        }
        assert!(
            reach(&a, b.addr, 9000),
            "not reachable after the link came back"
        );

        let new = Ipv4Addr::new(10, 77, 1, 102);
        lab.move_addr(1, new).unwrap();
        drop(l);
        let _l = start_listener(new);
        assert_eq!(lab.hosts[1].addr, new);
        assert!(!reach(&a, b.addr, 9000), "the old address still answers");
        // The bystander still reaches the moved host.
        assert!(reach(&lab.hosts[2].ns.clone(), new, 9000));
        drop(_l);

        drop(lab);
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        for n in names {
            assert!(
                !list
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(&n)),
                "{n} left behind"
            );
        }
    }
}
