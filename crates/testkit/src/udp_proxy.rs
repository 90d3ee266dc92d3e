//! A user-space UDP impairment proxy: delay with jitter, reordering and random loss, for links
//! that `tc netem` cannot shape (it does not exist on the kernels ferry is tested on).
//!
//! ```text
//!   client ──▶ proxy.listen ──(delay ± jitter, loss, reorder)──▶ upstream
//!   client ◀── proxy.listen ◀──(delay ± jitter, loss, reorder)── upstream
//! ```
//!
//! One client at a time: replies go to the address the last datagram came from, so a client
//! that changes address (QUIC migration) keeps working. Each direction holds at most
//! [`ImpairConfig::queue_packets`] datagrams in flight inside the proxy; beyond that new ones are
//! dropped and counted (like a router's full queue). The proxy runs on its own thread with its
//! own single-threaded tokio runtime, so sync tests can use it; dropping [`UdpProxy`] stops it.
//!
//! Jitter keeps the order of datagrams by default (a datagram never leaves before one that came
//! in earlier, as on a real queue); with [`ImpairConfig::jitter_reorders`] each datagram gets
//! its own delay and a burst is shuffled within the jitter window (what `netem` jitter does).
//! `reorder` holds a datagram back by one extra `delay`, with that probability, so it arrives
//! behind later ones.

use std::collections::BinaryHeap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How the proxy treats datagrams (the same in both directions).
#[derive(Debug, Clone)]
pub struct ImpairConfig {
    /// Base one-way delay.
    pub delay: Duration,
    /// Each datagram's delay is uniform in `delay ± jitter`.
    pub jitter: Duration,
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram is held back by one extra `delay` (reordering).
    pub reorder: f64,
    /// Whether jitter may reorder datagrams (each delayed independently); by default a
    /// datagram's delivery time is at least that of the datagram before it.
    pub jitter_reorders: bool,
    /// Datagrams held per direction; more are dropped.
    pub queue_packets: usize,
    /// Seed of the random choices (loss, jitter, reordering).
    pub seed: u64,
}

impl Default for ImpairConfig {
    fn default() -> Self {
        ImpairConfig {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(5),
            loss: 0.0,
            reorder: 0.0,
            jitter_reorders: false,
            queue_packets: 4096,
            seed: 1,
        }
    }
}

/// Counters, per direction (`to_upstream`, `to_client`).
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Datagrams forwarded towards the upstream.
    pub up_forwarded: AtomicU64,
    /// Datagrams forwarded back to the client.
    pub down_forwarded: AtomicU64,
    /// Datagrams dropped on purpose (loss).
    pub dropped_loss: AtomicU64,
    /// Datagrams dropped because a direction's queue was full.
    pub dropped_queue: AtomicU64,
    /// Datagrams held back for reordering.
    pub reordered: AtomicU64,
    /// Datagrams delivered before one that entered the proxy earlier (observed reordering).
    pub overtakes: AtomicU64,
}

/// A running proxy. Stops when dropped.
#[derive(Debug)]
pub struct UdpProxy {
    local: SocketAddr,
    stats: Arc<ProxyStats>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpProxy {
    /// Listens on `listen` (port 0 picks one) and forwards to `upstream`.
    pub fn start(listen: SocketAddr, upstream: SocketAddr, cfg: ImpairConfig) -> io::Result<Self> {
        if !(0.0..=1.0).contains(&cfg.loss) || !(0.0..=1.0).contains(&cfg.reorder) {
            return Err(io::Error::other(
                "loss and reorder are probabilities (0..=1)",
            ));
        }
        if cfg.queue_packets == 0 {
            return Err(io::Error::other("queue_packets must be at least 1"));
        }
        let front = std::net::UdpSocket::bind(listen)?;
        let unspecified: SocketAddr = if upstream.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .map_err(io::Error::other)?;
        let back = std::net::UdpSocket::bind(unspecified)?;
        back.connect(upstream)?;
        front.set_nonblocking(true)?;
        back.set_nonblocking(true)?;
        let local = front.local_addr()?;
        let stats = Arc::new(ProxyStats::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let st = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("udp-proxy".into())
            .spawn(move || {
                rt.block_on(async move {
                    let (Ok(front), Ok(back)) =
                        (UdpSocket::from_std(front), UdpSocket::from_std(back))
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = run(front, back, cfg, st) => {}
                        _ = stop_rx => {}
                    }
                });
            })?;
        Ok(UdpProxy {
            local,
            stats,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Where clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Live counters.
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A datagram waiting for its delivery time (earliest first; arrival order breaks ties).
struct Held {
    at: Instant,
    seq: u64,
    data: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // BinaryHeap is a max-heap: reverse for earliest first.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// One direction's queue.
struct Lane {
    heap: BinaryHeap<Held>,
    next_seq: u64,
    /// Highest sequence delivered so far (to count overtakes).
    delivered_max: Option<u64>,
    /// Delivery time of the last datagram queued in order (for order-keeping jitter).
    last_at: Option<Instant>,
}

impl Lane {
    fn new() -> Self {
        Lane {
            heap: BinaryHeap::new(),
            next_seq: 0,
            delivered_max: None,
            last_at: None,
        }
    }

    fn next_at(&self) -> Option<Instant> {
        self.heap.peek().map(|h| h.at)
    }

    /// Takes every datagram that is due at `now`.
    fn due(&mut self, now: Instant, st: &ProxyStats) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while self.heap.peek().is_some_and(|h| h.at <= now) {
            if let Some(h) = self.heap.pop() {
                if self.delivered_max.is_some_and(|m| m > h.seq) {
                    st.overtakes.fetch_add(1, Ordering::Relaxed);
                }
                self.delivered_max = Some(self.delivered_max.map_or(h.seq, |m| m.max(h.seq)));
                out.push(h.data);
            }
        }
        out
    }
}

/// Decides a datagram's fate and queues it.
fn admit(lane: &mut Lane, data: &[u8], cfg: &ImpairConfig, rng: &mut ChaCha8Rng, st: &ProxyStats) {
    if cfg.loss > 0.0 && rng.random::<f64>() < cfg.loss {
        st.dropped_loss.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if lane.heap.len() >= cfg.queue_packets {
        st.dropped_queue.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let base = cfg.delay.as_secs_f64();
    let j = cfg.jitter.as_secs_f64();
    let d = if j > 0.0 {
        (base + rng.random_range(-j..=j)).max(0.0)
    } else {
        base
    };
    let mut at = Instant::now() + Duration::from_secs_f64(d);
    if cfg.reorder > 0.0 && rng.random::<f64>() < cfg.reorder {
        at += Duration::from_secs_f64(base.max(0.001));
        st.reordered.fetch_add(1, Ordering::Relaxed);
    } else if !cfg.jitter_reorders {
        at = at.max(lane.last_at.unwrap_or(at));
        lane.last_at = Some(at);
    }
    let seq = lane.next_seq;
    lane.next_seq += 1;
    lane.heap.push(Held {
        at,
        seq,
        data: data.to_vec(),
    });
}

async fn run(front: UdpSocket, back: UdpSocket, cfg: ImpairConfig, st: Arc<ProxyStats>) {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut client: Option<SocketAddr> = None;
    let (mut up, mut down) = (Lane::new(), Lane::new());
    let mut buf_f = vec![0u8; 65536];
    let mut buf_b = vec![0u8; 65536];
    loop {
        let wake = [up.next_at(), down.next_at()].into_iter().flatten().min();
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = front.recv_from(&mut buf_f) => {
                if let Ok((n, from)) = r {
                    client = Some(from);
                    admit(&mut up, &buf_f[..n], &cfg, &mut rng, &st);
                }
            }
            r = back.recv(&mut buf_b) => {
                // Errors here are ICMP "port unreachable" while the upstream restarts: ignore.
                if let Ok(n) = r {
                    if client.is_some() {
                        admit(&mut down, &buf_b[..n], &cfg, &mut rng, &st);
                    }
                }
            }
            _ = sleep => {
                let now = Instant::now();
                for d in up.due(now, &st) {
                    if back.send(&d).await.is_ok() {
                        st.up_forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Some(c) = client {
                    for d in down.due(now, &st) {
                        if front.send_to(&d, c).await.is_ok() {
                            st.down_forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    #[test]
    fn delays_reorders_and_drops_both_ways() {
        // An echo server on loopback, behind the proxy.
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let echo_thread = std::thread::spawn(move || {
            echo.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut b = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut b) {
                if &b[..n] == b"stop" {
                    break;
                }
                let _ = echo.send_to(&b[..n], from);
            }
        });
        let cfg = ImpairConfig {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(5),
            loss: 0.1,
            reorder: 0.1,
            ..ImpairConfig::default()
        };
        let proxy = UdpProxy::start("127.0.0.1:0".parse().unwrap(), echo_addr, cfg).unwrap();
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        let t = std::time::Instant::now();
        c.send_to(&0u32.to_be_bytes(), proxy.local_addr()).unwrap();
        let mut b = [0u8; 64];
        // Retry until one round trip survives the 10% loss each way.
        let mut rtt = None;
        for i in 1..20u32 {
            if c.recv(&mut b).is_ok() {
                rtt = Some(t.elapsed());
                break;
            }
            c.send_to(&i.to_be_bytes(), proxy.local_addr()).unwrap();
        }
        let rtt = rtt.expect("a round trip through the proxy");
        assert!(
            rtt >= Duration::from_millis(30),
            "round trip {rtt:?} < 2 × (20 − 5) ms"
        );

        // The stream ends at the first 1 s without a datagram (generous for a loaded machine).
        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        // A stream (paced, so no socket buffer overflows): some are lost, the rest arrive,
        // some out of order.
        let n = 400u32;
        for i in 0..n {
            c.send_to(&(1000 + i).to_be_bytes(), proxy.local_addr())
                .unwrap();
            std::thread::sleep(Duration::from_micros(500));
        }
        let mut got = Vec::new();
        while let Ok(k) = c.recv(&mut b) {
            if k == 4 {
                got.push(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        got.retain(|&x| x >= 1000);
        let out_of_order = got.windows(2).filter(|w| w[1] < w[0]).count();
        // 10% loss each way: about 81% of 400 come back.
        assert!(
            (240..=380).contains(&got.len()),
            "{} of {n} came back",
            got.len()
        );
        assert!(out_of_order > 0, "no reordering seen");
        assert!(stat(&proxy.stats().dropped_loss) > 0);
        assert!(stat(&proxy.stats().reordered) > 0);
        assert!(stat(&proxy.stats().overtakes) > 0);
        let _ = c.send_to(b"stop", echo_addr);
        drop(proxy);
        echo_thread.join().unwrap();
    }

    #[test]
    fn full_queue_drops_and_counts() {
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let cfg = ImpairConfig {
            delay: Duration::from_millis(300),
            jitter: Duration::ZERO,
            queue_packets: 10,
            ..ImpairConfig::default()
        };
        let proxy = UdpProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            sink.local_addr().unwrap(),
            cfg,
        )
        .unwrap();
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..50u32 {
            c.send_to(&i.to_be_bytes(), proxy.local_addr()).unwrap();
        }
        sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 16];
        let mut n = 0;
        let t = std::time::Instant::now();
        while n < 10 && sink.recv(&mut b).is_ok() {
            n += 1;
        }
        assert_eq!(n, 10, "the queue holds 10");
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "delivered before the delay"
        );
        assert_eq!(stat(&proxy.stats().dropped_queue), 40);
    }

    #[test]
    fn rejects_bad_config() {
        let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let bad = ImpairConfig {
            loss: 1.5,
            ..ImpairConfig::default()
        };
        assert!(UdpProxy::start("127.0.0.1:0".parse().unwrap(), up, bad).is_err());
    }
}
