//! Per-chunk compression policy and the bounded, verifying decoder.
//!
//! Chat histories mix text that compresses 3–10× (SQLite pages of messages, JSON, logs) with media
//! that is already compressed (JPEG, MP4, AMR/SILK voice notes). Compressing media burns CPU for
//! nothing, so each chunk is judged from a cheap sample: the byte entropy of a few KiB spread over
//! the chunk. High-entropy chunks go raw; others are compressed with zstd and kept compressed
//! only if that saves at least [`CompressPolicy::min_saving`] of the bytes.
//!
//! Compression trades CPU for link time. With [`CompressPolicy::gate`] set, a sender turns it
//! on and off while it runs ([`run_auto`]): on while the machine's CPUs have room (a phone on
//! Wi-Fi, a laptop on gigabit Ethernet: the link is the limit and every byte saved is time
//! saved), off while they are the bottleneck (both devices on one machine, a link faster than
//! the CPUs), where zstd would only take cycles from encryption and the disk.
//!
//! The receiver never trusts the sender's encoding: [`decode_verified`] decompresses into a buffer
//! of exactly the chunk's declared length (a zstd bomb fails instead of allocating) and checks the
//! BLAKE3 hash before the bytes go anywhere.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::manifest::{ChunkHash, MAX_CHUNK_SIZE};

/// How a chunk's payload is encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum Encoding {
    Raw = 0,
    Zstd = 1,
}

impl Encoding {
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Encoding::Raw),
            1 => Some(Encoding::Zstd),
            _ => None,
        }
    }
}

/// When to compress.
#[derive(Clone, Debug)]
pub struct CompressPolicy {
    /// Compress at all.
    pub enabled: bool,
    /// zstd level (1 is fast and, on chat text, close to the ratio of higher levels).
    pub level: i32,
    /// Samples with more bits of entropy per byte than this are sent raw without trying.
    pub max_entropy_bits: f32,
    /// Keep the compressed form only if it is at most `1 - min_saving` of the original.
    pub min_saving: f32,
    /// When set, compress only while the gate is open (see [`run_auto`]); `None` compresses
    /// every chunk that qualifies.
    pub gate: Option<CompressGate>,
}

impl Default for CompressPolicy {
    fn default() -> Self {
        CompressPolicy {
            enabled: true,
            level: 1,
            max_entropy_bits: 7.2,
            min_saving: 0.1,
            gate: None,
        }
    }
}

/// A shared on/off switch for compression, flipped while a migration runs.
#[derive(Clone, Debug)]
pub struct CompressGate(Arc<AtomicBool>);

impl Default for CompressGate {
    fn default() -> Self {
        CompressGate(Arc::new(AtomicBool::new(true)))
    }
}

impl CompressGate {
    /// Whether chunks are compressed now.
    pub fn is_open(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, open: bool) {
        self.0.store(open, Ordering::Relaxed);
    }
}

/// The decision behind automatic compression, from how busy the machine's CPUs were over each
/// interval (0.0 idle … 1.0 saturated), with hysteresis so that it does not flap.
#[derive(Clone, Debug)]
pub struct AutoCompress {
    /// Stop compressing when the CPUs were at least this busy.
    pub stop_at: f32,
    /// Compress again once they were less busy than this.
    pub resume_below: f32,
    open: bool,
}

impl Default for AutoCompress {
    fn default() -> Self {
        AutoCompress {
            stop_at: 0.85,
            resume_below: 0.7,
            open: true,
        }
    }
}

impl AutoCompress {
    /// Takes one interval's CPU load and says whether to compress now.
    pub fn update(&mut self, busy: f32) -> bool {
        if self.open && busy >= self.stop_at {
            self.open = false;
        } else if !self.open && busy < self.resume_below {
            self.open = true;
        }
        self.open
    }
}

/// Cumulative CPU time of the whole machine (all CPUs), in the kernel's ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    /// Parses the aggregate `cpu` line of Linux's `/proc/stat`. Time waiting for I/O counts as
    /// idle: a CPU waiting for the disk has room for compression.
    pub fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map_while(|f| f.parse().ok())
            .collect();
        if v.len() < 4 {
            return None;
        }
        // user nice system idle iowait irq softirq steal (guest time is inside user already).
        let total: u64 = v.iter().take(8).fold(0u64, |a, &x| a.saturating_add(x));
        let idle = v[3].saturating_add(v.get(4).copied().unwrap_or(0));
        Some(CpuTimes {
            busy: total.saturating_sub(idle),
            total,
        })
    }

    /// The machine's CPU times now (`None` where the system does not expose them).
    pub fn now() -> Option<CpuTimes> {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| CpuTimes::parse(&s))
    }

    /// Share of the CPUs' time spent busy between `earlier` and `self`.
    pub fn busy_since(&self, earlier: &CpuTimes) -> Option<f32> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.checked_sub(earlier.busy)?;
        (total > 0).then(|| (busy as f32 / total as f32).min(1.0))
    }
}

/// How often [`run_auto`] looks at the CPU load.
pub const AUTO_INTERVAL: Duration = Duration::from_millis(250);

/// Opens and closes `gate` from the machine's CPU load until dropped (spawn it for as long as
/// chunks are being sent), starting from the gate's state. Where the load cannot be read, the
/// gate is opened and left so.
pub async fn run_auto(gate: CompressGate) {
    let mut auto = AutoCompress {
        open: gate.is_open(),
        ..AutoCompress::default()
    };
    let mut last = CpuTimes::now();
    if last.is_none() {
        // No way to tell: compress, as without a gate.
        gate.set(true);
        return;
    }
    loop {
        tokio::time::sleep(AUTO_INTERVAL).await;
        let now = CpuTimes::now();
        if let (Some(a), Some(b)) = (last, now) {
            if let Some(busy) = b.busy_since(&a) {
                let open = auto.update(busy);
                if open != gate.is_open() {
                    tracing::debug!(busy, open, "automatic compression");
                    gate.set(open);
                }
            }
        }
        last = now;
    }
}

/// Shannon entropy (bits per byte) of up to 8 KiB sampled from 8 places in `data`.
pub fn sample_entropy(data: &[u8]) -> f32 {
    const PIECES: usize = 8;
    const PIECE: usize = 1024;
    let mut counts = [0u32; 256];
    let mut n = 0u32;
    if data.len() <= PIECES * PIECE {
        for &b in data {
            counts[b as usize] += 1;
        }
        n = data.len() as u32;
    } else {
        let stride = (data.len() - PIECE) / (PIECES - 1);
        for i in 0..PIECES {
            for &b in &data[i * stride..i * stride + PIECE] {
                counts[b as usize] += 1;
            }
            n += PIECE as u32;
        }
    }
    if n == 0 {
        return 0.0;
    }
    let n = n as f32;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f32 / n;
            -p * p.log2()
        })
        .sum()
}

/// Encodes a chunk for the wire according to `policy`.
pub fn encode_chunk(data: Bytes, policy: &CompressPolicy) -> (Encoding, Bytes) {
    if !policy.enabled
        || policy.gate.as_ref().is_some_and(|g| !g.is_open())
        || data.len() < 512
        || sample_entropy(&data) > policy.max_entropy_bits
    {
        return (Encoding::Raw, data);
    }
    let limit = (data.len() as f32 * (1.0 - policy.min_saving)) as usize;
    match zstd::bulk::compress(&data, policy.level) {
        Ok(c) if c.len() <= limit => (Encoding::Zstd, Bytes::from(c)),
        _ => (Encoding::Raw, data),
    }
}

/// Why a received chunk was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChunkError {
    #[error("chunk payload of {got} bytes does not match its declared length {expected}")]
    Length { expected: u32, got: usize },
    #[error("compressed chunk does not decompress to its declared length {expected}: {why}")]
    Decompress { expected: u32, why: String },
    #[error("chunk data does not match its hash (expected {expected:?}, got {got:?})")]
    HashMismatch { expected: ChunkHash, got: ChunkHash },
}

/// Decodes a received payload into exactly `len` bytes and checks them against `hash`.
pub fn decode_verified(
    encoding: Encoding,
    payload: Bytes,
    len: u32,
    hash: &ChunkHash,
) -> Result<Bytes, ChunkError> {
    let data = match encoding {
        Encoding::Raw => {
            if payload.len() != len as usize {
                return Err(ChunkError::Length {
                    expected: len,
                    got: payload.len(),
                });
            }
            payload
        }
        Encoding::Zstd => {
            if len as usize > MAX_CHUNK_SIZE {
                return Err(ChunkError::Length {
                    expected: len,
                    got: 0,
                });
            }
            // Decompressing into a buffer of exactly `len` bytes' capacity: a payload that would
            // expand beyond it is an error, not an allocation.
            match zstd::bulk::decompress(&payload, len as usize) {
                Ok(out) if out.len() == len as usize => Bytes::from(out),
                Ok(out) => {
                    return Err(ChunkError::Length {
                        expected: len,
                        got: out.len(),
                    })
                }
                Err(e) => {
                    return Err(ChunkError::Decompress {
                        expected: len,
                        why: e.to_string(),
                    })
                }
            }
        }
    };
    let got = ChunkHash::of(&data);
    if got != *hash {
        return Err(ChunkError::HashMismatch {
            expected: *hash,
            got,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9E3779B97F4A7C15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn text_is_compressed_media_is_not() {
        let text = "你好，今天晚上一起吃饭吗？ See you at 7 at the usual place. ".repeat(3000);
        let (enc, out) = encode_chunk(Bytes::from(text.clone()), &CompressPolicy::default());
        assert_eq!(enc, Encoding::Zstd);
        assert!(out.len() < text.len() / 4);
        let back =
            decode_verified(enc, out, text.len() as u32, &ChunkHash::of(text.as_bytes())).unwrap();
        assert_eq!(back, text.as_bytes());

        let media = noise(200_000);
        let (enc, out) = encode_chunk(Bytes::from(media.clone()), &CompressPolicy::default());
        assert_eq!(enc, Encoding::Raw);
        assert_eq!(out, media);
    }

    #[test]
    fn a_closed_gate_sends_text_raw() {
        let text = "see you at 7 at the usual place. ".repeat(3000);
        let gate = CompressGate::default();
        let policy = CompressPolicy {
            gate: Some(gate.clone()),
            ..CompressPolicy::default()
        };
        assert_eq!(
            encode_chunk(Bytes::from(text.clone()), &policy).0,
            Encoding::Zstd
        );
        gate.set(false);
        let (enc, out) = encode_chunk(Bytes::from(text.clone()), &policy);
        assert_eq!(enc, Encoding::Raw);
        assert_eq!(out, text.as_bytes());
        gate.set(true);
        assert_eq!(encode_chunk(Bytes::from(text), &policy).0, Encoding::Zstd);
    }

    #[test]
    fn auto_compression_stops_on_saturated_cpus_and_resumes_with_room() {
        let mut a = AutoCompress::default();
        // Link-bound: the CPUs have room.
        assert!(a.update(0.3));
        assert!(a.update(0.8));
        // Saturated: stop; a dip just below the stop mark does not flap it back on.
        assert!(!a.update(0.97));
        assert!(!a.update(0.8));
        assert!(!a.update(0.9));
        // Clearly idle again: compress.
        assert!(a.update(0.5));
    }

    #[test]
    fn cpu_load_from_proc_stat() {
        let t0 = CpuTimes::parse(
            "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\nintr 1 2 3\n",
        )
        .unwrap();
        let t1 = CpuTimes::parse("cpu  250 0 100 850 50 0 0 0 0 0\n").unwrap();
        // 200 busy ticks out of 250.
        assert_eq!(t1.busy_since(&t0), Some(0.8));
        // Counters that went backwards or did not move give no reading.
        assert_eq!(t0.busy_since(&t1), None);
        assert_eq!(t0.busy_since(&t0), None);
        for bad in ["", "cpu0 1 2 3 4", "cpu  x y z", "cpu  1 2"] {
            assert_eq!(CpuTimes::parse(bad), None, "{bad:?}");
        }
        if cfg!(target_os = "linux") {
            assert!(CpuTimes::now().is_some());
        }
    }

    #[test]
    fn bomb_and_corruption_are_refused() {
        let zeros = vec![0u8; 4 << 20];
        let bomb = zstd::bulk::compress(&zeros, 3).unwrap();
        // Declared 1000 bytes, would expand to 4 MiB.
        let err = decode_verified(
            Encoding::Zstd,
            Bytes::from(bomb),
            1000,
            &ChunkHash::of(&zeros[..1000]),
        );
        assert!(matches!(
            err,
            Err(ChunkError::Decompress { .. }) | Err(ChunkError::Length { .. })
        ));

        let data = b"hello world".to_vec();
        let h = ChunkHash::of(&data);
        let mut bad = data.clone();
        bad[0] ^= 1;
        assert!(matches!(
            decode_verified(Encoding::Raw, Bytes::from(bad), 11, &h),
            Err(ChunkError::HashMismatch { .. })
        ));
        assert!(matches!(
            decode_verified(Encoding::Raw, Bytes::from(data.clone()), 12, &h),
            Err(ChunkError::Length { .. })
        ));
        assert!(matches!(
            decode_verified(Encoding::Zstd, Bytes::from_static(b"garbage!"), 11, &h),
            Err(ChunkError::Decompress { .. })
        ));
    }
}
