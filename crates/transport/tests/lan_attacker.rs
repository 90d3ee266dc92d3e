//! A LAN attacker (root only; prints a skip reason otherwise).
//!
//! Three hosts on a bridge the test creates (`ferry_testkit::netns`): the sender (h0), the
//! receiver (h1) and the attacker (h2). Each role is this test binary re-invoked inside its
//! namespace with `FERRY_NETNS_ROLE`. The attacker:
//! 1. answers mDNS as a sender named "sender" (same name as the real one) with its own key;
//! 2. connects to the sender's port with a key the sender never paired, without a code;
//! 3. guesses pairing codes (each wrong guess burns the sender's active code; the sender issues a
//!    new one as `ferry send` does);
//! 4. sits in the path as a UDP relay, records the real pairing exchange, and replays every
//!    recorded datagram to the sender, from the same socket and from a new one.
//!
//! None of it may yield pairing or data: the receiver, holding the real code, fails against the
//! fake sender (wrong code: SPAKE2 with the fake's own code); the sender admits nobody but the
//! real receiver; replays open no session. The real pair completes (through the relay, which only
//! forwards bytes) and completes again afterwards by pinned key, which the fake cannot answer.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_testkit::netns::{self, Lab};
use ferry_transport::*;

const ROLE: &str = "FERRY_NETNS_ROLE";

fn mdns_eth0() -> MdnsConfig {
    MdnsConfig {
        interfaces: MdnsInterfaces::Only(vec![MdnsInterface::Name("eth0".into())]),
        port: 5353,
    }
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"))
}

fn bind(home: &std::path::Path, name: &str) -> Endpoint {
    let dirs = FerryDirs::under(home);
    let cfg = EndpointConfig {
        bind: "0.0.0.0:0".parse().unwrap(),
        handshake_timeout: Duration::from_secs(5),
        ..EndpointConfig::default()
    };
    let identity = Identity::load_or_create(&dirs.config, name).unwrap();
    Endpoint::bind(identity, PeerStore::open(&dirs.config).unwrap(), cfg).unwrap()
}

/// Serves "pong:<what the peer sent>" on one connection.
async fn pong(conn: PeerConnection) {
    let Ok(mut r) = conn.accept_uni().await else {
        return;
    };
    let Ok(got) = r.read_to_end(1000).await else {
        return;
    };
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(b"pong:").await.unwrap();
    s.write_all(&got).await.unwrap();
    s.finish().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
}

async fn ping(conn: &PeerConnection) -> String {
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(b"ping").await.unwrap();
    s.finish().unwrap();
    let mut r = conn.accept_uni().await.unwrap();
    String::from_utf8_lossy(&r.read_to_end(1000).await.unwrap()).into_owned()
}

/// Entry point for child processes; a no-op in a normal test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_role() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    match role.as_str() {
        "sender" => {
            let ep = bind(&PathBuf::from(env("FERRY_HOME_DIR")), "sender");
            println!("ID {}", ep.identity().device_id());
            println!("PORT {}", ep.local_addr().unwrap().port());
            println!("CODE {}", ep.issue_pairing_code().unwrap());
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(60), ep.accept()).await {
                    Ok(Ok(c)) => {
                        println!(
                            "ACCEPTED {} newly_paired={}",
                            c.peer().name,
                            c.newly_paired()
                        );
                        tokio::spawn(pong(c));
                    }
                    Ok(Err(e)) => {
                        println!("ACCEPT_ERR {e}");
                        if let AcceptError::Pairing {
                            source: PairingError::WrongCode,
                            ..
                        } = e
                        {
                            // As `ferry send` does: the burned code is replaced once the
                            // back-off after failures in a row allows.
                            tokio::time::sleep(ep.pairing_gate().retry_in).await;
                            println!("CODE {}", ep.issue_pairing_code().unwrap());
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        "fake" => {
            let home = tempfile::tempdir().unwrap();
            let ep = bind(home.path(), "sender");
            let _code = ep.issue_pairing_code().unwrap();
            let mdns = MdnsDiscovery::new(&mdns_eth0()).unwrap();
            mdns.advertise(&Advertisement {
                name: "sender".into(),
                port: ep.local_addr().unwrap().port(),
                addrs: vec![],
            })
            .unwrap();
            println!("FAKE_READY");
            loop {
                match tokio::time::timeout(Duration::from_secs(60), ep.accept()).await {
                    Ok(Ok(c)) => println!("FAKE_ACCEPTED {}", c.peer().name),
                    Ok(Err(e)) => println!("FAKE_ACCEPT_ERR {e}"),
                    Err(_) => break,
                }
            }
        }
        "probe" => {
            let home = tempfile::tempdir().unwrap();
            let target: SocketAddr = env("FERRY_TARGET").parse().unwrap();
            let id: DeviceId = env("FERRY_ID").parse().unwrap();
            let ep = bind(home.path(), "attacker");
            // A key the sender never paired, no code: pretend we are paired.
            ep.peers()
                .upsert(PeerRecord::paired(
                    id,
                    "sender".into(),
                    Some(target),
                    PeerRole::Sender,
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs(),
                ))
                .unwrap();
            match ep.connect_peer(id, &[target]).await {
                Ok(_) => println!("NOKEY CONNECTED"),
                Err(e) => println!("NOKEY {e}"),
            }
            // Guesses: the real code is not known; these are certainly wrong.
            let real: PairingCode = env("FERRY_CODE").parse().unwrap();
            for i in 1..=2u32 {
                let guess = PairingCode::from_u32((real.as_u32() + i) % 100_000_000).unwrap();
                match ep.connect_with_code(&[target], guess).await {
                    Ok(_) => println!("GUESS{i} CONNECTED"),
                    Err(e) => println!("GUESS{i} {e}"),
                }
            }
            println!("PROBE_DONE");
        }
        "relay" => relay().await,
        "receiver" => {
            let ep = bind(&PathBuf::from(env("FERRY_HOME_DIR")), "receiver");
            let code: PairingCode = env("FERRY_CODE").parse().unwrap();
            let id: DeviceId = env("FERRY_ID").parse().unwrap();
            let found = tokio::task::spawn_blocking(|| {
                MdnsDiscovery::new(&mdns_eth0())
                    .unwrap()
                    .browse(Duration::from_secs(5))
                    .unwrap()
            })
            .await
            .unwrap();
            for s in &found {
                println!("FOUND {} {:?}", s.name, s.addrs);
                match ep.connect_with_code(&s.addrs, code).await {
                    Ok(c) => println!("FAKE_RESULT CONNECTED {}", c.peer().device_id == id),
                    Err(e) => println!("FAKE_RESULT {e}"),
                }
            }
            let relay: SocketAddr = env("FERRY_RELAY").parse().unwrap();
            let conn = ep.connect_with_code(&[relay], code).await.unwrap();
            println!("CONNECTED id_matches={}", conn.peer().device_id == id);
            println!("REPLY {}", ping(&conn).await);
            conn.close(close::DONE, b"done");
            ep.close(close::DONE, b"done").await;
        }
        "reconnect" => {
            let ep = bind(&PathBuf::from(env("FERRY_HOME_DIR")), "receiver");
            let id: DeviceId = env("FERRY_ID").parse().unwrap();
            let fake: SocketAddr = env("FERRY_FAKE").parse().unwrap();
            match ep.connect_peer(id, &[fake]).await {
                Ok(_) => println!("PINNED_FAKE CONNECTED"),
                Err(e) => println!("PINNED_FAKE {e}"),
            }
            let target: SocketAddr = env("FERRY_TARGET").parse().unwrap();
            let conn = ep.connect_peer(id, &[target]).await.unwrap();
            println!("REPLY {}", ping(&conn).await);
            conn.close(close::DONE, b"done");
            ep.close(close::DONE, b"done").await;
        }
        other => panic!("unknown role {other}"),
    }
}

/// A UDP relay: clients talk to it, it talks to the sender and records what clients sent.
/// When `FERRY_REPLAY_FLAG` appears it replays every recorded datagram to the sender.
async fn relay() {
    use tokio::net::UdpSocket;
    let target: SocketAddr = env("FERRY_TARGET").parse().unwrap();
    let flag = PathBuf::from(env("FERRY_REPLAY_FLAG"));
    let front = UdpSocket::bind("0.0.0.0:0").await.unwrap();
    let back = UdpSocket::bind("0.0.0.0:0").await.unwrap();
    println!("RELAY_PORT {}", front.local_addr().unwrap().port());
    let mut client: Option<SocketAddr> = None;
    let mut recorded: Vec<Vec<u8>> = Vec::new();
    let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !flag.exists() && Instant::now() < deadline {
        tokio::select! {
            r = front.recv_from(&mut a) => {
                let (n, from) = r.unwrap();
                client = Some(from);
                recorded.push(a[..n].to_vec());
                let _ = back.send_to(&a[..n], target).await;
            }
            r = back.recv_from(&mut b) => {
                let (n, _) = r.unwrap();
                if let Some(c) = client {
                    let _ = front.send_to(&b[..n], c).await;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    println!("RECORDED {}", recorded.len());
    let fresh = UdpSocket::bind("0.0.0.0:0").await.unwrap();
    let mut answers = 0usize;
    for sock in [&back, &fresh] {
        for d in &recorded {
            let _ = sock.send_to(d, target).await;
        }
    }
    // Whatever the sender answers (stateless resets, version negotiation) is counted.
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    loop {
        tokio::select! {
            r = back.recv_from(&mut b) => if r.is_ok() { answers += 1 },
            r = fresh.recv_from(&mut a) => if r.is_ok() { answers += 1 },
            _ = tokio::time::sleep_until(until) => break,
        }
    }
    println!("REPLAYED {} answers={answers}", 2 * recorded.len());
    println!("RELAY_DONE");
}

// ---------------------------------------------------------------------------------------------

struct Proc {
    child: Child,
    rx: mpsc::Receiver<String>,
    lines: Vec<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(ns: &str, role: &str, env: &[(&str, String)]) -> Proc {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Lab::command(ns, exe);
        cmd.args(["--exact", "lan_role", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::sync_channel(1024);
        let tag = role.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                // The harness prints "test lan_role ... " without a newline before our output.
                let line = line
                    .split_once("test lan_role ... ")
                    .map_or(line.as_str(), |(_, r)| r)
                    .to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            rx,
            lines: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix`; returns the rest of it.
    fn wait(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no {prefix:?} in {:#?}", self.lines));
            let line = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {prefix:?} in {:#?}", self.lines));
            self.lines.push(line.clone());
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.trim().to_string();
            }
        }
    }

    /// Collects lines until none came for `quiet`.
    fn settle(&mut self, quiet: Duration) {
        while let Ok(line) = self.rx.recv_timeout(quiet) {
            self.lines.push(line);
        }
    }

    fn count(&self, prefix: &str) -> usize {
        self.lines.iter().filter(|l| l.starts_with(prefix)).count()
    }

    fn last(&self, prefix: &str) -> Option<String> {
        self.lines
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix(prefix).map(|r| r.trim().to_string()))
    }
}

#[test]
fn lan_attacker_gets_no_pairing_and_no_data() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    if let Some(reason) = netns::skip_reason() {
        println!("SKIP lan_attacker_gets_no_pairing_and_no_data: {reason}");
        return;
    }
    let lab = match Lab::new(3) {
        Ok(l) => l,
        Err(e) => {
            println!(
                "SKIP lan_attacker_gets_no_pairing_and_no_data: cannot create namespaces: {e}"
            );
            return;
        }
    };
    let started = Instant::now();
    let (h0, h1, h2) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
    let homes = tempfile::tempdir().unwrap();
    let home = |n: &str| homes.path().join(n).display().to_string();

    let mut sender = Proc::spawn(&h0.ns, "sender", &[("FERRY_HOME_DIR", home("sender"))]);
    let id = sender.wait("ID ");
    let port = sender.wait("PORT ");
    let code = sender.wait("CODE ");
    let target = format!("{}:{port}", h0.addr);

    // 1. A fake sender on mDNS.
    let mut fake = Proc::spawn(&h2.ns, "fake", &[]);
    fake.wait("FAKE_READY");

    // 2-3. No key, then two code guesses.
    let mut probe = Proc::spawn(
        &h2.ns,
        "probe",
        &[
            ("FERRY_TARGET", target.clone()),
            ("FERRY_ID", id.clone()),
            ("FERRY_CODE", code.clone()),
        ],
    );
    let nokey = probe.wait("NOKEY ");
    let guess1 = probe.wait("GUESS1 ");
    let guess2 = probe.wait("GUESS2 ");
    probe.wait("PROBE_DONE");
    assert!(nokey.contains("not paired"), "{nokey}");
    assert!(guess1.contains("wrong code"), "{guess1}");
    assert!(!guess2.contains("CONNECTED"), "{guess2}");
    sender.settle(Duration::from_millis(500));
    assert_eq!(sender.count("ACCEPTED"), 0, "{:#?}", sender.lines);
    assert!(sender.count("ACCEPT_ERR") >= 3, "{:#?}", sender.lines);
    // The first code was burned by the guess; the sender shows a new one (after each wrong
    // code, once the back-off for failures in a row allows: wait for the last).
    let wrong = sender
        .lines
        .iter()
        .filter(|l| l.starts_with("ACCEPT_ERR") && l.contains("wrong code"))
        .count();
    while sender.count("CODE ") < 1 + wrong {
        sender.wait("CODE ");
    }
    let code = sender.last("CODE ").unwrap();
    // The relay below runs on the attacker's host: its address made two wrong guesses in a row
    // and is barred from pairing for 4 s (per-address limit); the real pair waits that out.
    std::thread::sleep(Duration::from_secs(5));

    // 4. The real receiver, through the attacker's relay; it first meets the fake on mDNS.
    let flag = homes.path().join("replay-now");
    let mut relay = Proc::spawn(
        &h2.ns,
        "relay",
        &[
            ("FERRY_TARGET", target.clone()),
            ("FERRY_REPLAY_FLAG", flag.display().to_string()),
        ],
    );
    let relay_addr = format!("{}:{}", h2.addr, relay.wait("RELAY_PORT "));
    let mut receiver = Proc::spawn(
        &h1.ns,
        "receiver",
        &[
            ("FERRY_HOME_DIR", home("receiver")),
            ("FERRY_CODE", code),
            ("FERRY_ID", id.clone()),
            ("FERRY_RELAY", relay_addr),
        ],
    );
    let found = receiver.wait("FOUND ");
    assert!(found.starts_with("sender"), "{found}");
    assert!(
        found.contains(&h2.addr.to_string()),
        "the fake was not seen: {found}"
    );
    let fake_result = receiver.wait("FAKE_RESULT ");
    assert!(fake_result.contains("wrong code"), "{fake_result}");
    assert_eq!(receiver.wait("CONNECTED "), "id_matches=true");
    assert_eq!(receiver.wait("REPLY "), "pong:ping");
    assert!(receiver.child.wait().unwrap().success());
    sender.settle(Duration::from_millis(300));
    assert_eq!(sender.count("ACCEPTED"), 1, "{:#?}", sender.lines);
    let fake_addr = format!("{}:{}", h2.addr, {
        // The fake's port is in the FOUND line: "sender [10.77.1.3:PORT, ...]".
        let after = found.split(&format!("{}:", h2.addr)).nth(1).unwrap();
        after
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
    });

    // Replay everything the receiver sent, from the relay's socket and from a new one.
    std::fs::write(&flag, b"").unwrap();
    let recorded: usize = relay.wait("RECORDED ").parse().unwrap();
    assert!(recorded > 5, "{recorded}");
    let replayed = relay.wait("REPLAYED ");
    relay.wait("RELAY_DONE");
    sender.settle(Duration::from_millis(700));
    assert_eq!(
        sender.count("ACCEPTED"),
        1,
        "a replay opened a session: {replayed} {:#?}",
        sender.lines
    );

    // The real pair still completes, by pinned key; the fake cannot answer for that key.
    let mut again = Proc::spawn(
        &h1.ns,
        "reconnect",
        &[
            ("FERRY_HOME_DIR", home("receiver")),
            ("FERRY_ID", id),
            ("FERRY_TARGET", target),
            ("FERRY_FAKE", fake_addr),
        ],
    );
    let pinned_fake = again.wait("PINNED_FAKE ");
    assert!(!pinned_fake.contains("CONNECTED"), "{pinned_fake}");
    assert_eq!(again.wait("REPLY "), "pong:ping");
    assert!(again.child.wait().unwrap().success());
    sender.settle(Duration::from_millis(300));
    assert_eq!(sender.count("ACCEPTED"), 2, "{:#?}", sender.lines);
    assert_eq!(
        sender.last("ACCEPTED ").as_deref(),
        Some("receiver newly_paired=false")
    );
    fake.settle(Duration::from_millis(200));
    assert_eq!(fake.count("FAKE_ACCEPTED"), 0, "{:#?}", fake.lines);
    println!(
        "lan attacker: no key -> {nokey}; guess -> {guess1}; fake sender -> {fake_result}; \
         pinned fake -> {pinned_fake}; replay of {recorded} datagrams -> {replayed}; {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
