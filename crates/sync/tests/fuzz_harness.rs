//! The fuzz harnesses of `ferry_sync::fuzzing` on stable: every committed corpus and regression
//! input (`fuzz/corpus`, `fuzz/regressions`), the honest seeds, and a few hundred proptest
//! mutations of them. The cargo-fuzz targets in `fuzz/` run the same functions under libFuzzer
//! (`scripts/fuzz.sh`). Kept to a few seconds.

use std::fs;
use std::path::PathBuf;

use ferry_sync::fuzzing;
use ferry_sync::proto::frame::{Frame, Message};
use proptest::prelude::*;

const TARGETS: [&str; 4] = ["frames", "manifest", "receiver", "sender"];

fn run(target: &str, data: &[u8]) {
    match target {
        "frames" => fuzzing::frames(data),
        "manifest" => fuzzing::manifest(data),
        "receiver" => fuzzing::receiver(data),
        "sender" => fuzzing::sender(data),
        other => panic!("unknown target {other}"),
    }
}

fn committed_inputs() -> Vec<(String, PathBuf)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        for t in TARGETS {
            let Ok(rd) = fs::read_dir(root.join(kind).join(t)) else {
                continue;
            };
            for e in rd.flatten() {
                out.push((t.to_string(), e.path()));
            }
        }
    }
    out
}

#[test]
fn committed_corpus_and_regressions_pass() {
    let inputs = committed_inputs();
    assert!(
        inputs.len() >= TARGETS.len(),
        "the committed seed corpus is missing"
    );
    for (t, p) in inputs {
        let data = fs::read(&p).unwrap();
        run(&t, &data);
    }
}

#[test]
fn honest_seeds_pass() {
    let seeds = fuzzing::seed_corpus();
    for t in TARGETS {
        assert!(seeds.iter().any(|(s, _)| *s == t), "no seed for {t}");
    }
    // The seeds reach the end of a session: the receiver's stream ends with Done.
    let (_, r2s) = seeds.iter().find(|(t, _)| *t == "sender").unwrap();
    let mut b = bytes::BytesMut::from(&r2s[..]);
    let (mut done, mut durable) = (false, false);
    while let Some(f) = ferry_sync::proto::frame::decode_frame(&mut b).unwrap() {
        done |= matches!(f, Frame::Message(Message::Done { .. }));
        durable |= matches!(f, Frame::Message(Message::Durable { .. }));
    }
    assert!(done, "the honest seed session did not complete");
    // Version 3: the mutations start from streams that carry the receiver's durable reports.
    assert!(durable, "the honest seed session has no durable report");
    for (t, data) in seeds {
        run(t, &data);
    }
}

/// Byte-level mutations like libFuzzer's: flips, overwrites, truncation, duplication.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn mutate(mut data: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        if data.is_empty() {
            break;
        }
        let n = data.len();
        match *m {
            Mutation::Flip(i, b) => data[i % n] ^= b | 1,
            Mutation::Set(i, b) => data[i % n] = b,
            Mutation::Truncate(i) => data.truncate(i % n),
            Mutation::Duplicate(i, len) => {
                let i = i % n;
                let piece = data[i..(i + len % 64).min(n)].to_vec();
                data.splice(i..i, piece);
            }
        }
    }
    data
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>()).prop_map(|(i, l)| Mutation::Duplicate(i, l)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_seeds(which in any::<prop::sample::Index>(), muts in prop::collection::vec(arb_mutation(), 1..6)) {
        let seeds = fuzzing::seed_corpus();
        let (t, data) = &seeds[which.index(seeds.len())];
        run(t, &mutate(data.clone(), &muts));
    }

    #[test]
    fn random_bytes(t in 0usize..4, data in prop::collection::vec(any::<u8>(), 0..512)) {
        run(TARGETS[t], &data);
    }
}

/// Writes the honest seeds to `fuzz/corpus/<target>/seed-<n>`:
/// `cargo test -p ferry-sync --test fuzz_harness -- --ignored write_seed_corpus`.
#[test]
#[ignore]
fn write_seed_corpus() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for (i, (t, data)) in fuzzing::seed_corpus().into_iter().enumerate() {
        let dir = root.join(t);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("seed-{i}")), data).unwrap();
    }
}
