//! Media blobs: high-entropy bytes (like already-compressed JPEG/MP4/AMR) behind real magic
//! headers, written in large chunks from a per-file ChaCha8 stream.
//!
//! Each blob is fully determined by `(kind, size, content_seed)`, so a forwarded copy is written
//! by generating the same stream again instead of reading the original back.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Chunk size for media writes: large writes keep generation at disk/PRNG speed.
pub(crate) const CHUNK: usize = 1 << 20;

/// What a blob is; decides extension, magic header and trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum BlobKind {
    /// Chat thumbnail, JPEG, 2–30 KB.
    Thumb,
    /// Voice note, AMR-NB.
    VoiceAmr,
    /// Voice note, SILK v3 (as some chat apps store it).
    VoiceSilk,
    /// Photo, JPEG, 100 KB–5 MB.
    Image,
    /// Video, MP4, 5–200 MB.
    Video,
    /// Sticker / emoji cache entry (the small-files knob).
    Sticker,
    /// A PDF document.
    Pdf,
}

impl BlobKind {
    pub(crate) fn ext(self) -> &'static str {
        match self {
            BlobKind::Thumb | BlobKind::Image => "jpg",
            BlobKind::VoiceAmr => "amr",
            BlobKind::VoiceSilk => "silk",
            BlobKind::Video => "mp4",
            BlobKind::Sticker => "gif",
            BlobKind::Pdf => "pdf",
        }
    }

    /// Unscaled size range in bytes (inclusive low, exclusive high).
    pub(crate) fn size_range(self) -> (u64, u64) {
        const K: u64 = 1000;
        const M: u64 = 1000 * K;
        match self {
            BlobKind::Thumb => (2 * K, 30 * K),
            BlobKind::VoiceAmr | BlobKind::VoiceSilk => (3 * K, 60 * K),
            BlobKind::Image => (100 * K, 5 * M),
            BlobKind::Video => (5 * M, 200 * M),
            BlobKind::Sticker => (2 * K, 20 * K),
            BlobKind::Pdf => (20 * K, 2 * M),
        }
    }

    fn header(self, size: u64) -> Vec<u8> {
        match self {
            BlobKind::Thumb | BlobKind::Image => vec![
                0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0x00, 0x01, 0x01, 0x00,
                0x00, 0x48, 0x00, 0x48, 0x00, 0x00,
            ],
            BlobKind::VoiceAmr => b"#!AMR\n".to_vec(),
            BlobKind::VoiceSilk => b"\x02#!SILK_V3".to_vec(),
            BlobKind::Sticker => b"GIF89a".to_vec(),
            BlobKind::Pdf => b"%PDF-1.7\n%\xE2\xE3\xCF\xD3\n".to_vec(),
            BlobKind::Video => {
                // ftyp box (32 bytes) followed by the header of an mdat box holding the rest.
                let mut h = Vec::with_capacity(40);
                h.extend_from_slice(&32u32.to_be_bytes());
                h.extend_from_slice(b"ftypisom");
                h.extend_from_slice(&0x200u32.to_be_bytes());
                h.extend_from_slice(b"isomiso2avc1mp41");
                let mdat = u32::try_from(size.saturating_sub(32)).unwrap_or(1);
                h.extend_from_slice(&mdat.to_be_bytes());
                h.extend_from_slice(b"mdat");
                h
            }
        }
    }

    fn trailer(self) -> &'static [u8] {
        match self {
            BlobKind::Thumb | BlobKind::Image => &[0xFF, 0xD9],
            BlobKind::Pdf => b"\n%%EOF\n",
            _ => &[],
        }
    }
}

/// Write `size` bytes of a `kind` blob to `path`, reusing `buf` (grown to [`CHUNK`]).
pub(crate) fn write_blob(
    path: &Path,
    kind: BlobKind,
    size: u64,
    content_seed: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(content_seed);
    let header = kind.header(size);
    let trailer = kind.trailer();
    let framed = size >= (header.len() + trailer.len()) as u64;
    if buf.len() < CHUNK {
        buf.resize(CHUNK, 0);
    }
    let mut file = File::create(path)?;
    let mut written = 0u64;
    while written < size {
        let n = usize::try_from((size - written).min(CHUNK as u64)).unwrap_or(CHUNK);
        let chunk = &mut buf[..n];
        rng.fill_bytes(chunk);
        if written == 0 {
            let h = header.len().min(n);
            chunk[..h].copy_from_slice(&header[..h]);
        }
        if framed && written + n as u64 == size && n >= trailer.len() {
            chunk[n - trailer.len()..].copy_from_slice(trailer);
        }
        file.write_all(chunk)?;
        written += n as u64;
    }
    Ok(())
}

/// Sample a size for `kind`, log-uniform in its range, scaled down so that no single file
/// exceeds `cap` (small histories get small videos rather than no videos).
pub(crate) fn sample_size(rng: &mut ChaCha8Rng, kind: BlobKind, cap: u64) -> u64 {
    use rand::RngExt;
    let (lo, hi) = kind.size_range();
    let hi = hi.min(cap).max(64);
    let lo = lo.min(hi / 2).max(32);
    let u: f64 = rng.random();
    let ln = (lo as f64).ln() + u * ((hi as f64).ln() - (lo as f64).ln());
    (ln.exp() as u64).clamp(lo, hi)
}
