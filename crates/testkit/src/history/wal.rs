//! Make an un-checkpointed `-wal` file reproducible.
//!
//! SQLite picks random salts when it starts a WAL file, and every frame checksum chains from
//! them, so two otherwise identical runs leave different `-wal` bytes. [`normalize_wal`]
//! rewrites the salts with seeded values and recomputes the header and frame checksums as the
//! WAL format specifies (<https://www.sqlite.org/fileformat2.html#walformat>); SQLite then reads
//! the file exactly as it would have read the original. Frames left over from an earlier salt
//! generation (already invalid to SQLite) are cut off.

use std::path::Path;

use anyhow::{bail, Context as _};

const HEADER: usize = 32;
const FRAME_HEADER: usize = 24;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// The WAL checksum: Fibonacci-weighted sums over pairs of 32-bit words in `big`/little order.
fn checksum(big_endian: bool, data: &[u8], mut s0: u32, mut s1: u32) -> (u32, u32) {
    let word = |c: &[u8]| {
        let w = [c[0], c[1], c[2], c[3]];
        if big_endian {
            u32::from_be_bytes(w)
        } else {
            u32::from_le_bytes(w)
        }
    };
    for pair in data.chunks_exact(8) {
        s0 = s0.wrapping_add(word(&pair[..4])).wrapping_add(s1);
        s1 = s1.wrapping_add(word(&pair[4..])).wrapping_add(s0);
    }
    (s0, s1)
}

/// Rewrite the salts of the WAL file at `path` to `salts` and fix every checksum.
/// Returns the number of valid frames kept.
pub(crate) fn normalize_wal(path: &Path, salts: (u32, u32)) -> anyhow::Result<u64> {
    let mut data = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    if data.is_empty() {
        return Ok(0);
    }
    if data.len() < HEADER {
        bail!("{}: truncated WAL header", path.display());
    }
    let big_endian = match be32(&data, 0) {
        0x377f_0682 => false,
        0x377f_0683 => true,
        other => bail!("{}: not a WAL file (magic {other:#x})", path.display()),
    };
    let page_size = be32(&data, 8) as usize;
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        bail!("{}: bad WAL page size {page_size}", path.display());
    }
    let old = (be32(&data, 16), be32(&data, 20));
    put32(&mut data, 16, salts.0);
    put32(&mut data, 20, salts.1);
    let (mut s0, mut s1) = checksum(big_endian, &data[..24], 0, 0);
    put32(&mut data, 24, s0);
    put32(&mut data, 28, s1);

    let frame_len = FRAME_HEADER + page_size;
    let mut off = HEADER;
    let mut frames = 0u64;
    while off + frame_len <= data.len() {
        if (be32(&data, off + 8), be32(&data, off + 12)) != old {
            break; // stale frame from an earlier generation: SQLite ignores it too
        }
        put32(&mut data, off + 8, salts.0);
        put32(&mut data, off + 12, salts.1);
        (s0, s1) = checksum(big_endian, &data[off..off + 8], s0, s1);
        (s0, s1) = checksum(
            big_endian,
            &data[off + FRAME_HEADER..off + frame_len],
            s0,
            s1,
        );
        put32(&mut data, off + 16, s0);
        put32(&mut data, off + 20, s1);
        off += frame_len;
        frames += 1;
    }
    data.truncate(off);
    std::fs::write(path, &data).with_context(|| format!("write {}", path.display()))?;
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::checksum;

    #[test]
    fn checksum_matches_reference_recurrence() {
        let data: Vec<u8> = (0u8..16).collect();
        let (a, b) = checksum(false, &data, 0, 0);
        // words LE: 0x03020100, 0x07060504, 0x0b0a0908, 0x0f0e0d0c
        let s0 = 0x0302_0100u32;
        let s1 = 0x0706_0504u32.wrapping_add(s0);
        let s0b = s0.wrapping_add(0x0b0a_0908).wrapping_add(s1);
        let s1b = s1.wrapping_add(0x0f0e_0d0c).wrapping_add(s0b);
        assert_eq!((a, b), (s0b, s1b));
    }
}
