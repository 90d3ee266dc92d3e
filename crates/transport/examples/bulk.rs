//! Raw QUIC bulk throughput between two ferry endpoints on loopback.
//!
//! `cargo run -p ferry-transport --example bulk -- [MiB, default 1024] [bbr|cubic|newreno]
//! [loss %, default 0] [one-way delay ms, default 0]`
//! Pairs two in-memory identities on 127.0.0.1, then for 1, 4 and 8 concurrent
//! unidirectional streams sends the total split across the streams and reports MB/s
//! (10^6 bytes per second) measured at the receiver. With loss or delay, traffic goes through
//! a small UDP relay on 127.0.0.1 that drops packets at random and delays both directions.

use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_transport::*;

fn config(cc: Congestion) -> EndpointConfig {
    EndpointConfig {
        bind: "127.0.0.1:0".parse().expect("static addr"),
        congestion: cc,
        ..EndpointConfig::default()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let total_mib: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let cc = match args.get(2).map(String::as_str) {
        Some("cubic") => Congestion::Cubic,
        None | Some("bbr") => Congestion::Bbr,
        Some("newreno") => Congestion::NewReno,
        Some(other) => anyhow::bail!("unknown congestion controller {other}"),
    };
    let loss: f64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(0.0);
    let delay_ms: u64 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let server = Endpoint::bind(
        Identity::generate("server")?,
        PeerStore::in_memory(),
        config(cc),
    )?;
    let client = Endpoint::bind(
        Identity::generate("client")?,
        PeerStore::in_memory(),
        config(cc),
    )?;
    let code = server.issue_pairing_code()?;
    let mut ticket = server.ticket(code)?;
    if loss > 0.0 || delay_ms > 0 {
        let relay = lossy_relay(
            server.local_addr()?,
            loss / 100.0,
            Duration::from_millis(delay_ms),
        )
        .await?;
        ticket.addrs = vec![relay];
        println!("via relay: {loss}% loss, {delay_ms} ms each way");
    }
    let t0 = Instant::now();
    let (s, c) = tokio::join!(server.accept(), client.connect_ticket(&ticket));
    let connect = t0.elapsed();
    let (s, c) = (s.context("accept")?, c.context("connect")?);
    println!(
        "ticket connect + pairing: {:.2} ms",
        connect.as_secs_f64() * 1e3
    );
    // Pinned reconnect, for comparison.
    let t0 = Instant::now();
    let sid = server.identity().device_id();
    let (s2, c2) = tokio::join!(server.accept(), client.connect_peer(sid, &ticket.addrs));
    println!(
        "pinned reconnect: {:.2} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    drop((s2?, c2?));

    let total = total_mib << 20;
    println!("congestion: {cc:?}, total {total_mib} MiB per run");
    for streams in [1u64, 4, 8] {
        let per = total / streams;
        let recv = {
            let s = s.clone();
            tokio::spawn(async move {
                let mut tasks = Vec::new();
                for _ in 0..streams {
                    let mut r = s.accept_uni().await?;
                    tasks.push(tokio::spawn(async move {
                        let mut n = 0u64;
                        while let Some(chunk) = r.read_chunk(1 << 20, false).await? {
                            n += chunk.bytes.len() as u64;
                        }
                        anyhow::Ok(n)
                    }));
                }
                let mut n = 0;
                for t in tasks {
                    n += t.await??;
                }
                anyhow::Ok((n, Instant::now()))
            })
        };
        let start = Instant::now();
        let mut senders = Vec::new();
        for _ in 0..streams {
            let mut w = c.open_uni().await?;
            senders.push(tokio::spawn(async move {
                let block = bytes_block();
                let mut left = per;
                while left > 0 {
                    let n = left.min(block.len() as u64) as usize;
                    w.write_chunk(block.slice(..n)).await?;
                    left -= n as u64;
                }
                w.finish()?;
                anyhow::Ok(())
            }));
        }
        for t in senders {
            t.await??;
        }
        let (n, end) = tokio::time::timeout(Duration::from_secs(300), recv).await???;
        let secs = (end - start).as_secs_f64();
        println!(
            "{streams} stream(s): {:.0} MB in {:.2} s = {:.0} MB/s",
            n as f64 / 1e6,
            secs,
            n as f64 / 1e6 / secs
        );
    }
    c.close(close::DONE, b"done");
    client.close(close::DONE, b"done").await;
    Ok(())
}

fn bytes_block() -> bytes::Bytes {
    bytes::Bytes::from((0..1u32 << 20).map(|i| (i * 31) as u8).collect::<Vec<u8>>())
}

/// A UDP relay between one client and `server` that drops `loss` of the packets (each
/// direction) and delays the rest by `delay`. Queues are bounded; overflow is dropped too.
async fn lossy_relay(
    server: std::net::SocketAddr,
    loss: f64,
    delay: Duration,
) -> anyhow::Result<std::net::SocketAddr> {
    let sock = std::sync::Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await?);
    let addr = sock.local_addr()?;
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(Instant, std::net::SocketAddr, Vec<u8>)>(1 << 16);
    let out = sock.clone();
    tokio::spawn(async move {
        while let Some((at, to, buf)) = rx.recv().await {
            tokio::time::sleep_until(at.into()).await;
            let _ = out.send_to(&buf, to).await;
        }
    });
    tokio::spawn(async move {
        let mut client = None;
        let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let to = if from == server {
                match client {
                    Some(c) => c,
                    None => continue,
                }
            } else {
                client = Some(from);
                server
            };
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if (rng >> 11) as f64 / (1u64 << 53) as f64 >= loss {
                let _ = tx.try_send((Instant::now() + delay, to, buf[..n].to_vec()));
            }
        }
    });
    Ok(addr)
}
