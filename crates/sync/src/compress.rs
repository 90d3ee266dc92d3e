//! Per-chunk compression policy and the bounded, verifying decoder.
//!
//! Chat histories mix text that compresses 3–10× (SQLite pages of messages, JSON, logs) with media
//! that is already compressed (JPEG, MP4, AMR/SILK voice notes). Compressing media burns CPU for
//! nothing, so each chunk is judged from a cheap sample: the byte entropy of a few KiB spread over
//! the chunk. High-entropy chunks go raw; others are compressed with zstd and kept compressed
//! only if that saves at least [`CompressPolicy::min_saving`] of the bytes.
//!
//! Compression trades CPU for link time. With [`CompressPolicy::gate`] set, the application
//! turns it on and off per connection: ferry compresses over a network and not between two
//! devices on one machine, where there is no link to save time on and zstd only takes cycles
//! from the encryption and the disk that both ends share.
//!
//! The receiver never trusts the sender's encoding: [`decode_verified`] decompresses into a buffer
//! of exactly the chunk's declared length (a zstd bomb fails instead of allocating) and checks the
//! BLAKE3 hash before the bytes go anywhere.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    /// When set, compress only while the gate is open; `None` compresses every chunk that
    /// qualifies.
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

/// A shared on/off switch for compression, flipped while a migration runs (per connection).
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
