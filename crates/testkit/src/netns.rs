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

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
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
