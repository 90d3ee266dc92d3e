//! A generated chat history migrates byte for byte, and `ferry verify` agrees.

use ferry_testkit::assert_histories_equal;

use crate::util::*;

#[test]
fn generated_history_migrates_and_verifies() {
    let src = shared_history(48, 7);
    let m = migrate(src);
    assert_histories_equal(src, &m.dest).unwrap();
    let (code, err) = verify(&m.dest);
    assert_eq!(code, 0, "ferry verify failed: {err}");
    // Same counts on both sides, and the receiver saw real payload.
    for f in ["files", "bytes"] {
        assert_eq!(m.send_done[f], m.recv_done[f], "{f} differ");
    }
    let bytes = u64_of(&m.recv_done, "bytes");
    let wire = u64_of(&m.recv_done, "wire_bytes");
    assert!(bytes > 40 * MIB, "history is only {bytes} bytes");
    assert!(
        wire > 0 && wire <= bytes,
        "wire bytes {wire} out of range (history {bytes})"
    );
    assert_eq!(
        u64_of(&m.send_done, "wire_bytes"),
        wire,
        "sender and receiver count different wire bytes in a clean run"
    );
    eprintln!(
        "clean migration: {bytes} bytes, {wire} on the wire, receiver {:.2} s",
        m.recv_done["elapsed_s"].as_f64().unwrap_or(0.0)
    );
}
