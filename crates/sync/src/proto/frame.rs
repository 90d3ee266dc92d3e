//! Frame encoding: a length prefix, a tag, and a body.
//!
//! ```text
//! frame   := len:u32le body            (len = body length, 1 ..= MAX_FRAME_BODY)
//! body    := 0x00 hello | 0x01 message | 0x02 chunk
//! hello   := magic "FRRY" version:u16le role:u8        (role: 1 sender, 2 receiver)
//! message := postcard(Message)       (variant index, then the fields as varints/bytes; see
//!                                      `Message`: 0 Manifest, 1 ManifestEnd, 2 Want, 3 WantEnd,
//!                                      4 Rejected, 5 Done, 6 Close, 7 NextRound (v ≥ 2),
//!                                      8 Durable (v ≥ 3): bytes:varint)
//! chunk   := id:u32le encoding:u8 raw_len:u32le payload…
//!            (id: unique-chunk id; encoding: 0 raw, 1 zstd; raw_len: the chunk's length
//!             before encoding; payload: the rest of the body)
//! ```
//! The hello has a fixed layout so that any future version can still read and refuse it; chunk
//! payloads bypass postcard so they are neither copied nor re-encoded. Decoding never panics and
//! never allocates more than the frame's own (bounded) length.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::compress::Encoding;
use crate::manifest::{ChunkHash, ChunkId, ManifestSummary, WireEntry, MAX_CHUNK_SIZE};

/// Magic number opening every hello.
pub const MAGIC: [u8; 4] = *b"FRRY";
/// The protocol version this build speaks. Version 2 added [`Message::NextRound`] (catch-up
/// rounds on one connection); version 3 added [`Message::Durable`] (the receiver reports what
/// it holds during a round); version 4 streams the manifest: the sender announces entries as
/// it scans, and the receiver may send `Want` (and receive chunks) before `ManifestEnd`.
pub const PROTOCOL_VERSION: u16 = 4;
/// The oldest version this build still talks to (a version-1 peer gets single-round sessions).
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Largest frame body: a maximal chunk, zstd's worst-case expansion, and headers.
pub const MAX_FRAME_BODY: usize = MAX_CHUNK_SIZE + MAX_CHUNK_SIZE / 128 + 4096;
/// Manifest frames are cut well below the maximum so that control traffic stays responsive.
pub const MANIFEST_FRAME_TARGET: usize = 256 * 1024;
/// Most want ranges in one frame.
pub const MAX_RANGES_PER_FRAME: usize = 64 * 1024;

const TAG_HELLO: u8 = 0;
const TAG_MESSAGE: u8 = 1;
const TAG_CHUNK: u8 = 2;
const CHUNK_HEADER: usize = 4 + 1 + 4 + 1 + 4;

/// Which side a hello comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Sender = 1,
    Receiver = 2,
}

/// Opens every session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub role: Role,
}

/// A half-open range of unique-chunk ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRange {
    pub start: ChunkId,
    pub end: ChunkId,
}

/// Control messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Sender → receiver: the next manifest entries, in path order.
    Manifest(Vec<WireEntry>),
    /// Sender → receiver: the manifest is complete.
    ManifestEnd(ManifestSummary),
    /// Receiver → sender: chunks it wants (may be split over several frames).
    Want(Vec<ChunkRange>),
    /// Receiver → sender: the want list is complete; `chunks` and `bytes` total it.
    WantEnd { chunks: u64, bytes: u64 },
    /// Receiver → sender: a chunk failed verification; it is wanted again.
    Rejected { chunk: ChunkId },
    /// Receiver → sender: everything is verified and committed under this root.
    Done { root: ChunkHash },
    /// Either side: the session ends, with a reason.
    Close { code: u16, reason: String },
    /// Sender → receiver (version ≥ 2): this round is over and another follows on a new control
    /// stream. After the receiver's `Done` it means "the source changed meanwhile"; before it,
    /// "a source file changed under the read: keep what you verified and start over".
    NextRound,
    /// Receiver → sender (only to a sender whose hello says version ≥ 3): `bytes` of this
    /// round's file bytes (the manifest summary's `bytes`, duplicates counted per file) are
    /// verified and durable here — committed to the journal, or already in place or in the
    /// journal when the round began. Sent after `WantEnd` and after group commits, at most a
    /// few times a second, only when the figure grew. The sender treats it as a claim: it
    /// clamps it to the round's total and ignores a figure below one it already had.
    Durable { bytes: u64 },
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Message(Message),
    Chunk {
        id: ChunkId,
        encoding: Encoding,
        raw_len: u32,
        payload: Bytes,
    },
}

impl Frame {
    /// The frame's kind in a word (`chunk`, `want`, …), for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Chunk { .. } => "chunk",
            Frame::Message(m) => match m {
                Message::Manifest(_) => "manifest",
                Message::ManifestEnd(_) => "manifest-end",
                Message::Want(_) => "want",
                Message::WantEnd { .. } => "want-end",
                Message::Rejected { .. } => "rejected",
                Message::Done { .. } => "done",
                Message::NextRound => "next-round",
                Message::Durable { .. } => "durable",
                Message::Close { .. } => "close",
            },
        }
    }
}

/// A frame that cannot be decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the maximum of {MAX_FRAME_BODY}")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    #[error("not a ferry peer (bad magic number)")]
    BadMagic,
    #[error("the peer speaks ferry protocol version {theirs}, this build speaks {ours}: update the older device's ferry")]
    UnsupportedVersion { theirs: u16, ours: u16 },
    #[error("malformed hello")]
    BadHello,
    #[error("malformed chunk frame")]
    BadChunk,
    #[error("malformed message: {0}")]
    BadMessage(String),
}

/// Encodes a hello frame.
pub fn encode_hello(h: &Hello) -> Bytes {
    let mut b = BytesMut::with_capacity(12);
    b.put_u32_le(8);
    b.put_u8(TAG_HELLO);
    b.put_slice(&MAGIC);
    b.put_u16_le(h.version);
    b.put_u8(h.role as u8);
    b.freeze()
}

/// Encodes a control message frame.
pub fn encode_message(m: &Message) -> Result<Bytes, FrameError> {
    let mut out = vec![0u8; 5];
    out[4] = TAG_MESSAGE;
    let mut out = postcard::to_extend(m, out).map_err(|e| FrameError::BadMessage(e.to_string()))?;
    let body = out.len() - 4;
    if body > MAX_FRAME_BODY {
        return Err(FrameError::TooLarge(body));
    }
    out[..4].copy_from_slice(&(body as u32).to_le_bytes());
    Ok(Bytes::from(out))
}

/// Encodes the header of a chunk frame; the payload follows it on the wire unchanged.
pub fn encode_chunk_header(
    id: ChunkId,
    encoding: Encoding,
    raw_len: u32,
    payload_len: usize,
) -> Bytes {
    let mut b = BytesMut::with_capacity(CHUNK_HEADER);
    b.put_u32_le((CHUNK_HEADER - 4 + payload_len) as u32);
    b.put_u8(TAG_CHUNK);
    b.put_u32_le(id.0);
    b.put_u8(encoding as u8);
    b.put_u32_le(raw_len);
    b.freeze()
}

/// Pulls the next complete frame out of `buf`, if there is one. Errors are final for the stream.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_BODY {
        return Err(FrameError::TooLarge(len));
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let body = buf.split_to(len).freeze();
    decode_body(body).map(Some)
}

/// Decodes one frame body (without its length prefix).
pub fn decode_body(mut body: Bytes) -> Result<Frame, FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    let tag = body.get_u8();
    match tag {
        TAG_HELLO => {
            if body.len() < 4 || body[..4] != MAGIC {
                return Err(FrameError::BadMagic);
            }
            body.advance(4);
            if body.len() < 2 {
                return Err(FrameError::BadHello);
            }
            let version = body.get_u16_le();
            if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
                return Err(FrameError::UnsupportedVersion {
                    theirs: version,
                    ours: PROTOCOL_VERSION,
                });
            }
            if body.len() != 1 {
                return Err(FrameError::BadHello);
            }
            let role = match body.get_u8() {
                1 => Role::Sender,
                2 => Role::Receiver,
                _ => return Err(FrameError::BadHello),
            };
            Ok(Frame::Hello(Hello { version, role }))
        }
        TAG_MESSAGE => postcard::from_bytes(&body)
            .map(Frame::Message)
            .map_err(|e| FrameError::BadMessage(e.to_string())),
        TAG_CHUNK => {
            if body.len() < CHUNK_HEADER - 5 {
                return Err(FrameError::BadChunk);
            }
            let id = ChunkId(body.get_u32_le());
            let encoding = Encoding::from_u8(body.get_u8()).ok_or(FrameError::BadChunk)?;
            let raw_len = body.get_u32_le();
            Ok(Frame::Chunk {
                id,
                encoding,
                raw_len,
                payload: body,
            })
        }
        other => Err(FrameError::UnknownTag(other)),
    }
}

/// Encodes any frame into one buffer (tests and small control traffic).
pub fn encode_frame(f: &Frame) -> Result<Bytes, FrameError> {
    match f {
        Frame::Hello(h) => Ok(encode_hello(h)),
        Frame::Message(m) => encode_message(m),
        Frame::Chunk {
            id,
            encoding,
            raw_len,
            payload,
        } => {
            let mut b =
                BytesMut::from(&encode_chunk_header(*id, *encoding, *raw_len, payload.len())[..]);
            b.extend_from_slice(payload);
            Ok(b.freeze())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{EntryKind, Mtime};
    use proptest::prelude::*;

    fn arb_hash() -> impl Strategy<Value = ChunkHash> {
        any::<[u8; 32]>().prop_map(ChunkHash)
    }

    fn arb_entry() -> impl Strategy<Value = WireEntry> {
        (
            "[a-z/文😀 ]{0,40}",
            prop_oneof![
                Just(EntryKind::Dir),
                (17u8..=22).prop_map(|s| EntryKind::File { chunk_shift: s }),
                "[a-z./]{0,20}".prop_map(|t| EntryKind::Symlink { target: t }),
            ],
            any::<u64>(),
            any::<u32>(),
            any::<i64>(),
            any::<u32>(),
            prop::collection::vec(arb_hash(), 0..5),
        )
            .prop_map(|(path, kind, size, mode, secs, nanos, hashes)| WireEntry {
                path,
                kind,
                size,
                mode,
                mtime: Mtime { secs, nanos },
                hashes,
            })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            prop::collection::vec(arb_entry(), 0..8).prop_map(Message::Manifest),
            (arb_hash(), any::<[u64; 5]>()).prop_map(|(root, n)| Message::ManifestEnd(
                ManifestSummary {
                    root,
                    entries: n[0],
                    files: n[1],
                    bytes: n[2],
                    unique_chunks: n[3],
                    unique_bytes: n[4],
                }
            )),
            prop::collection::vec((any::<u32>(), any::<u32>()), 0..20).prop_map(|v| Message::Want(
                v.into_iter()
                    .map(|(start, end)| ChunkRange {
                        start: ChunkId(start),
                        end: ChunkId(end)
                    })
                    .collect()
            )),
            (any::<u64>(), any::<u64>())
                .prop_map(|(chunks, bytes)| Message::WantEnd { chunks, bytes }),
            any::<u32>().prop_map(|chunk| Message::Rejected {
                chunk: ChunkId(chunk)
            }),
            arb_hash().prop_map(|root| Message::Done { root }),
            Just(Message::NextRound),
            any::<u64>().prop_map(|bytes| Message::Durable { bytes }),
            (any::<u16>(), ".{0,30}").prop_map(|(code, reason)| Message::Close { code, reason }),
        ]
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            prop_oneof![Just(Role::Sender), Just(Role::Receiver)].prop_map(|role| Frame::Hello(
                Hello {
                    version: PROTOCOL_VERSION,
                    role
                }
            )),
            arb_message().prop_map(Frame::Message),
            (
                any::<u32>(),
                any::<bool>(),
                any::<u32>(),
                prop::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(id, z, raw_len, p)| Frame::Chunk {
                    id: ChunkId(id),
                    encoding: if z { Encoding::Zstd } else { Encoding::Raw },
                    raw_len,
                    payload: Bytes::from(p),
                }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(frames in prop::collection::vec(arb_frame(), 1..6), split in any::<prop::sample::Index>()) {
            let mut wire = BytesMut::new();
            for f in &frames {
                wire.extend_from_slice(&encode_frame(f).unwrap());
            }
            // Deliver in two pieces at an arbitrary split point.
            let at = split.index(wire.len() + 1);
            let mut buf = BytesMut::from(&wire[..at]);
            let mut out = Vec::new();
            while let Some(f) = decode_frame(&mut buf).unwrap() { out.push(f); }
            buf.extend_from_slice(&wire[at..]);
            while let Some(f) = decode_frame(&mut buf).unwrap() { out.push(f); }
            prop_assert_eq!(out, frames);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..100 {
                match decode_frame(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }

        #[test]
        fn garbage_bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
            let _ = decode_body(Bytes::from(bytes));
        }
    }

    #[test]
    fn hello_checks() {
        let mut b = BytesMut::from(
            &encode_hello(&Hello {
                version: 1,
                role: Role::Sender,
            })[..],
        );
        assert_eq!(
            decode_frame(&mut b).unwrap(),
            Some(Frame::Hello(Hello {
                version: 1,
                role: Role::Sender
            }))
        );
        let mut raw = encode_hello(&Hello {
            version: 9,
            role: Role::Sender,
        })
        .to_vec();
        let mut b = BytesMut::from(&raw[..]);
        assert_eq!(
            decode_frame(&mut b),
            Err(FrameError::UnsupportedVersion {
                theirs: 9,
                ours: PROTOCOL_VERSION
            })
        );
        raw[5] = b'X';
        let mut b = BytesMut::from(&raw[..]);
        assert_eq!(decode_frame(&mut b), Err(FrameError::BadMagic));
    }

    #[test]
    fn the_encoder_writes_the_grammar_of_the_module_docs() {
        let hello = encode_hello(&Hello {
            version: 2,
            role: Role::Receiver,
        });
        assert_eq!(
            &hello[..],
            &[8, 0, 0, 0, 0, b'F', b'R', b'R', b'Y', 2, 0, 2]
        );
        let mut chunk =
            encode_chunk_header(ChunkId(0x0403_0201), Encoding::Zstd, 0x0807_0605, 3).to_vec();
        chunk.extend_from_slice(b"abc");
        let body_len = 1 + 4 + 1 + 4 + 3;
        assert_eq!(
            chunk,
            [
                &(body_len as u32).to_le_bytes()[..],
                &[TAG_CHUNK],
                &[1, 2, 3, 4],
                &[Encoding::Zstd as u8],
                &[5, 6, 7, 8],
                b"abc",
            ]
            .concat()
        );
        let message = encode_message(&Message::NextRound).unwrap();
        let body = postcard::to_allocvec(&Message::NextRound).unwrap();
        assert_eq!(
            message.to_vec(),
            [
                &((1 + body.len()) as u32).to_le_bytes()[..],
                &[TAG_MESSAGE],
                &body
            ]
            .concat()
        );
    }

    #[test]
    fn ids_cross_the_wire_as_their_integers() {
        // Postcard: the variant index, then varints, exactly as when the ids were plain u32s.
        let rejected = encode_message(&Message::Rejected {
            chunk: ChunkId(300),
        })
        .unwrap();
        assert_eq!(&rejected[..], &[4, 0, 0, 0, TAG_MESSAGE, 4, 0xac, 0x02]);
        let want = encode_message(&Message::Want(vec![ChunkRange {
            start: ChunkId(1),
            end: ChunkId(2),
        }]))
        .unwrap();
        assert_eq!(&want[..], &[5, 0, 0, 0, TAG_MESSAGE, 2, 1, 1, 2]);
        // Version 3's report: variant 8, then the byte count as a varint.
        let durable = encode_message(&Message::Durable { bytes: 300 }).unwrap();
        assert_eq!(&durable[..], &[4, 0, 0, 0, TAG_MESSAGE, 8, 0xac, 0x02]);
        // A byte count that overflows a u64, or is cut short, is a malformed message.
        for body in [
            &[
                TAG_MESSAGE,
                8,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0x7f,
            ][..],
            &[TAG_MESSAGE, 8, 0x80][..],
            &[TAG_MESSAGE, 8][..],
        ] {
            assert!(matches!(
                decode_body(Bytes::copy_from_slice(body)),
                Err(FrameError::BadMessage(_))
            ));
        }
        // The largest count decodes (the sender clamps it to the round's total).
        let max = encode_message(&Message::Durable { bytes: u64::MAX }).unwrap();
        assert_eq!(
            decode_frame(&mut BytesMut::from(&max[..])),
            Ok(Some(Frame::Message(Message::Durable { bytes: u64::MAX })))
        );
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut b = BytesMut::from(&u32::MAX.to_le_bytes()[..]);
        assert_eq!(
            decode_frame(&mut b),
            Err(FrameError::TooLarge(u32::MAX as usize))
        );
        // A message claiming a billion entries in a tiny frame fails without allocating them.
        let mut body = vec![TAG_MESSAGE, 0];
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x03]);
        assert!(matches!(
            decode_body(Bytes::from(body)),
            Err(FrameError::BadMessage(_))
        ));
    }
}
