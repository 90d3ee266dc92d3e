//! Network-namespace tests (root only; they print a skip reason otherwise).
//!
//! Two hosts on a bridge created by the test (see `ferry_testkit::netns`). Each side runs as a
//! child process: this test binary re-invoked under `ip netns exec NS` with `FERRY_NETNS_ROLE`
//! selecting `sender` or `receiver` (the `netns_role` entry point below). mDNS only ever runs
//! inside those namespaces; nothing is sent on the host's interfaces.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ferry_testkit::netns::{self, Lab};
use ferry_transport::*;

const ROLE: &str = "FERRY_NETNS_ROLE";

fn mdns_eth0() -> MdnsConfig {
    MdnsConfig {
        interfaces: MdnsInterfaces::Only(vec![MdnsInterface::Name("eth0".into())]),
        port: 5353,
    }
}

/// Entry point for child processes; a no-op in a normal test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_role() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let dirs = FerryDirs::under(home.path());
    let cfg = EndpointConfig {
        bind: "0.0.0.0:0".parse().unwrap(),
        handshake_timeout: Duration::from_secs(10),
        ..EndpointConfig::default()
    };
    let identity = Identity::load_or_create(&dirs.config, &role).unwrap();
    let ep = Endpoint::bind(identity, PeerStore::open(&dirs.config).unwrap(), cfg).unwrap();
    match role.as_str() {
        "sender" => {
            let code = ep.issue_pairing_code().unwrap();
            let ticket = ep.ticket(code).unwrap();
            let mdns = MdnsDiscovery::new(&mdns_eth0()).unwrap();
            let ad = Advertisement {
                name: "sender".into(),
                port: ep.local_addr().unwrap().port(),
                addrs: ticket.addrs.iter().map(|a| a.ip()).collect(),
            };
            mdns.advertise(&ad).unwrap();
            println!("CODE {code}");
            println!("TICKET {ticket}");
            let conn = loop {
                match tokio::time::timeout(Duration::from_secs(60), ep.accept()).await {
                    Ok(Ok(c)) => break c,
                    Ok(Err(e)) => println!("ACCEPT_ERR {e}"),
                    Err(_) => panic!("sender: nobody connected"),
                }
            };
            let mut r = conn.accept_uni().await.unwrap();
            let got = r.read_to_end(1000).await.unwrap();
            let mut s = conn.open_uni().await.unwrap();
            s.write_all(b"pong:").await.unwrap();
            s.write_all(&got).await.unwrap();
            s.finish().unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            println!("SENDER_DONE");
        }
        "receiver" => {
            let code: PairingCode = std::env::var("FERRY_CODE").unwrap().parse().unwrap();
            let started = std::time::Instant::now();
            let found = tokio::task::spawn_blocking(|| {
                let d = MdnsDiscovery::new(&mdns_eth0()).unwrap();
                d.browse(Duration::from_secs(5)).unwrap()
            })
            .await
            .unwrap();
            let discovered_ms = started.elapsed().as_millis();
            let conn = if let Some(s) = found.first() {
                println!("FOUND {} {:?}", s.name, s.addrs);
                let report = tokio::task::spawn_blocking(|| {
                    doctor(&DoctorConfig {
                        mdns: Some(mdns_eth0()),
                        self_test_wait: Duration::from_secs(2),
                        quic_port: None,
                    })
                })
                .await
                .unwrap();
                println!("DOCTOR_MDNS {:?}", report.mdns);
                let t = std::time::Instant::now();
                let conn = ep.connect_with_code(&s.addrs, code).await.unwrap();
                // Figures for the closing note: browse returns shortly after the first answer.
                println!(
                    "TIMING mdns: found in {discovered_ms} ms, authenticated in {} ms",
                    t.elapsed().as_millis()
                );
                conn
            } else {
                println!("DISCOVERY_TIMEOUT");
                let report = tokio::task::spawn_blocking(|| {
                    doctor(&DoctorConfig {
                        mdns: Some(mdns_eth0()),
                        self_test_wait: Duration::from_secs(2),
                        quic_port: Some(4433),
                    })
                })
                .await
                .unwrap();
                println!("DOCTOR_MDNS {:?}", report.mdns);
                for i in &report.interfaces {
                    println!(
                        "DOCTOR_IF {} up={} mc={:?} {:?}",
                        i.name, i.up, i.multicast, i.addrs
                    );
                }
                for a in &report.advice {
                    println!("ADVICE {a}");
                }
                let ticket: Ticket = std::env::var("FERRY_TICKET").unwrap().parse().unwrap();
                let t = std::time::Instant::now();
                let conn = ep.connect_ticket(&ticket).await.unwrap();
                println!(
                    "TIMING ticket: authenticated in {} ms",
                    t.elapsed().as_millis()
                );
                conn
            };
            println!("CONNECTED {} {}", conn.peer().name, conn.peer().addr);
            let mut s = conn.open_uni().await.unwrap();
            s.write_all(b"ping").await.unwrap();
            s.finish().unwrap();
            let mut r = conn.accept_uni().await.unwrap();
            let reply = r.read_to_end(1000).await.unwrap();
            println!("REPLY {}", String::from_utf8_lossy(&reply));
            conn.close(close::DONE, b"done");
            ep.close(close::DONE, b"done").await;
        }
        other => panic!("unknown role {other}"),
    }
}

fn spawn_role(ns: &str, role: &str, env: &[(&str, &str)]) -> (Child, mpsc::Receiver<String>) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Lab::command(ns, exe);
    cmd.args(["--exact", "netns_role", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::sync_channel(256);
    let tag = role.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("[{tag}] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Collects lines until one starts with `prefix` (returns it) or the timeout passes.
fn wait_for(rx: &mpsc::Receiver<String>, prefix: &str, all: &mut Vec<String>) -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        let raw = rx.recv_timeout(left).ok()?;
        // The test harness prints "test netns_role ... " without a newline before our output.
        let line = raw
            .split_once("test netns_role ... ")
            .map_or(raw.as_str(), |(_, r)| r);
        all.push(line.to_string());
        if line.starts_with(prefix) {
            return Some(line.to_string());
        }
    }
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lab_or_skip(test: &str) -> Option<Lab> {
    if std::env::var(ROLE).is_ok() {
        return None;
    }
    if let Some(reason) = netns::skip_reason() {
        println!("SKIP {test}: {reason}");
        return None;
    }
    match Lab::new(2) {
        Ok(l) => Some(l),
        Err(e) => {
            println!("SKIP {test}: cannot create namespaces: {e}");
            None
        }
    }
}

fn run_pair(lab: &Lab, expect_discovery: bool) -> Vec<String> {
    let (s, srx) = spawn_role(&lab.hosts[0].ns, "sender", &[]);
    let _s = Kill(s);
    let mut lines = Vec::new();
    let code = wait_for(&srx, "CODE ", &mut lines).expect("sender code");
    let ticket = wait_for(&srx, "TICKET ", &mut lines).expect("sender ticket");
    let code = code.trim_start_matches("CODE ").to_string();
    let ticket = ticket.trim_start_matches("TICKET ").to_string();
    assert!(ticket
        .parse::<Ticket>()
        .unwrap()
        .addrs
        .iter()
        .all(|a| a.ip() == lab.hosts[0].addr));
    let (r, rrx) = spawn_role(
        &lab.hosts[1].ns,
        "receiver",
        &[("FERRY_CODE", &code), ("FERRY_TICKET", &ticket)],
    );
    let mut r = Kill(r);
    let reply = wait_for(&rrx, "REPLY ", &mut lines);
    assert_eq!(reply.as_deref(), Some("REPLY pong:ping"), "{lines:#?}");
    let found = lines.iter().any(|l| l.starts_with("FOUND sender"));
    assert_eq!(found, expect_discovery, "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("CONNECTED sender 10.77.1.1:")),
        "{lines:#?}"
    );
    assert!(r.0.wait().unwrap().success());
    lines
}

#[test]
fn netns_mdns_discovery_then_connect() {
    let Some(lab) = lab_or_skip("netns_mdns_discovery_then_connect") else {
        return;
    };
    let lines = run_pair(&lab, true);
    assert!(
        lines.iter().any(|l| l == "DOCTOR_MDNS SawItself"),
        "{lines:#?}"
    );
}

#[test]
fn netns_multicast_dropped_discovery_fails_ticket_works() {
    let Some(lab) = lab_or_skip("netns_multicast_dropped_discovery_fails_ticket_works") else {
        return;
    };
    if !netns::have("iptables") {
        println!("SKIP netns_multicast_dropped: iptables not installed");
        return;
    }
    for h in &lab.hosts {
        for chain in ["OUTPUT", "INPUT"] {
            let v4 = ["iptables", "-A", chain, "-d", "224.0.0.251", "-j", "DROP"];
            // mDNS also runs over IPv6 link-local multicast; a real firewall blocks both.
            let v6 = ["ip6tables", "-A", chain, "-d", "ff02::fb", "-j", "DROP"];
            for rule in [&v4, &v6] {
                if let Err(e) = Lab::run_in(&h.ns, rule) {
                    // E.g. a kernel without netfilter support in this container.
                    println!("SKIP netns_multicast_dropped: cannot add firewall rule: {e}");
                    return;
                }
            }
        }
    }
    let lines = run_pair(&lab, false);
    assert!(lines.iter().any(|l| l == "DISCOVERY_TIMEOUT"), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l == "DOCTOR_MDNS NotSeen"),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ADVICE mDNS discovery failed") && l.contains("ticket")),
        "{lines:#?}"
    );
}
