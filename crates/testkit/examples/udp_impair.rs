//! Runs the UDP impairment proxy on its own, for scripts and manual runs:
//!
//! ```text
//! cargo run --release -p ferry-testkit --example udp_impair -- LISTEN UPSTREAM \
//!     [--delay-ms 20] [--jitter-ms 5] [--loss 0] [--reorder 0] [--shuffle] [--seconds N]
//! ```
//!
//! Prints `listening ADDR` once ready, then the counters when it stops (after `--seconds`, or
//! on end of standard input).

use std::time::Duration;

use anyhow::{bail, Context as _};
use ferry_testkit::udp_proxy::{ImpairConfig, UdpProxy};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().context("LISTEN address missing")?.parse()?;
    let upstream = args.next().context("UPSTREAM address missing")?.parse()?;
    let mut cfg = ImpairConfig::default();
    let mut seconds = None;
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--delay-ms" => cfg.delay = Duration::from_secs_f64(val()?.parse::<f64>()? / 1e3),
            "--jitter-ms" => cfg.jitter = Duration::from_secs_f64(val()?.parse::<f64>()? / 1e3),
            "--loss" => cfg.loss = val()?.parse()?,
            "--reorder" => cfg.reorder = val()?.parse()?,
            "--shuffle" => cfg.jitter_reorders = true,
            "--seconds" => seconds = Some(val()?.parse::<f64>()?),
            other => bail!("unknown option {other}"),
        }
    }
    let proxy = UdpProxy::start(listen, upstream, cfg)?;
    println!("listening {}", proxy.local_addr());
    match seconds {
        Some(s) => std::thread::sleep(Duration::from_secs_f64(s)),
        None => {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink)? > 0 {}
        }
    }
    let st = proxy.stats();
    let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "up {} down {} lost {} queue-drops {} held-back {} overtakes {}",
        n(&st.up_forwarded),
        n(&st.down_forwarded),
        n(&st.dropped_loss),
        n(&st.dropped_queue),
        n(&st.reordered),
        n(&st.overtakes)
    );
    Ok(())
}
