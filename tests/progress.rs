//! What the `progress` events say: the sender's scan and send progress, the receiver's rate
//! after a resume (bytes already there are not speed), and a stall as soon as the sender goes
//! silent (issue 18, items 5 and 6). The sender's sending progress counts what the receiver
//! confirmed (protocol 3).

use std::time::{Duration, Instant};

use ferry_testkit::assert_histories_equal;
use serde_json::Value;

use crate::util::*;

/// The senders' cap in these tests, in bytes per second (`--limit-rate 8MB`): 48 MiB take
/// about 6 s, long enough to act mid-transfer however fast the machine is.
const CAP: u64 = 8_000_000;
const LIMIT: &str = "8MB";

fn phase(ev: &Value) -> &str {
    ev["phase"].as_str().unwrap_or("")
}

/// Reads the receiver's events until `bytes_done` reaches `fraction` of the total; returns
/// that progress event.
fn progress_to(r: &mut Ferry, fraction: f64) -> Value {
    let deadline = Instant::now() + LONG;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = r.wait_any(&["progress", "done"], left);
        assert_eq!(ev["event"], "progress", "finished before {fraction}: {ev}");
        let (done, total) = (u64_of(&ev, "bytes_done"), u64_of(&ev, "bytes_total"));
        if total > 0 && done as f64 >= fraction * total as f64 {
            return ev;
        }
    }
}

#[test]
fn sender_reports_scanning_then_sending_progress() {
    let src = shared_history(48, 7);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    let (mut s, addr, code) =
        start_sender_with(&old, src, "127.0.0.1:0", &["--limit-rate", "24MB"]);
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    let done = s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    assert_histories_equal(src, &dest).unwrap();

    let progress: Vec<&Value> = s.seen_named("progress");
    let scanning: Vec<&Value> = progress
        .iter()
        .copied()
        .filter(|e| phase(e) == "scanning")
        .collect();
    let sending: Vec<&Value> = progress
        .iter()
        .copied()
        .filter(|e| phase(e) == "sending")
        .collect();
    assert_eq!(
        scanning.len() + sending.len(),
        progress.len(),
        "a sender progress event without a known phase: {progress:?}"
    );
    assert!(!scanning.is_empty(), "no scanning progress");
    assert!(
        sending.len() >= 2,
        "fewer than two sending progress events: {sending:?}"
    );
    let first_sending = progress.iter().position(|e| phase(e) == "sending").unwrap();
    let last_scanning = progress
        .iter()
        .rposition(|e| phase(e) == "scanning")
        .unwrap();
    assert!(
        last_scanning < first_sending,
        "scanning after sending: {progress:?}"
    );
    // The scan: a fresh device hashes everything; its last event says so.
    let last = scanning.last().unwrap();
    let manifest = s.seen_named("manifest")[0].clone();
    assert_eq!(u64_of(last, "bytes_done"), u64_of(last, "bytes_total"));
    assert_eq!(
        u64_of(last, "bytes_done"),
        u64_of(&manifest, "hashed_bytes")
    );
    assert_eq!(u64_of(last, "files_done"), u64_of(&done, "files"), "{last}");
    let hashed: Vec<u64> = scanning.iter().map(|e| u64_of(e, "bytes_done")).collect();
    assert!(
        hashed.windows(2).all(|w| w[0] <= w[1]),
        "scanning bytes_done went back: {hashed:?}"
    );
    // Sending: what the receiver confirmed (it speaks protocol 3), monotonic, within the
    // total, reported during the round (not only at its end), ending at the round's total,
    // which is the migration's.
    assert!(
        sending.iter().all(|e| e["basis"] == "verified"),
        "a sending event not confirmed by the receiver: {sending:?}"
    );
    let bytes: Vec<u64> = sending.iter().map(|e| u64_of(e, "bytes_done")).collect();
    assert!(
        bytes.windows(2).all(|w| w[0] <= w[1]),
        "sending bytes_done went back: {bytes:?}"
    );
    let total = u64_of(sending[0], "bytes_total");
    assert!(bytes.iter().all(|&b| b <= total), "{bytes:?} of {total}");
    assert!(
        bytes.iter().any(|&b| b > 0 && b < total),
        "no confirmed progress during the round: {bytes:?}"
    );
    let last = sending.last().unwrap();
    assert_eq!(u64_of(last, "bytes_done"), u64_of(last, "bytes_total"));
    assert_eq!(u64_of(last, "bytes_total"), u64_of(&done, "bytes"));
    assert_eq!(u64_of(last, "files_total"), u64_of(&done, "files"));
    assert!(
        sending.iter().any(|e| e["rate_bps"].is_u64()),
        "no sending event has a rate: {sending:?}"
    );
}

#[test]
fn rate_after_a_resume_counts_only_what_crosses() {
    let src = shared_history(48, 7);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    let (mut s, addr, code) = start_sender_with(&old, src, "127.0.0.1:0", &["--limit-rate", LIMIT]);
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    progress_to(&mut r, 0.5);
    r.kill9();
    drop(r);

    // The same command again: it resumes with half the history already here.
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    let resumed = r.wait_event("resumed", LONG);
    let have = u64_of(&resumed, "bytes_have");
    assert!(have > 0, "nothing was kept: {resumed}");
    r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    assert_histories_equal(src, &dest).unwrap();

    let rates = rates(&r);
    assert!(!rates.is_empty(), "no rate after the resume:\n{:?}", r.seen);
    // At the cap, half the history takes about 3 s; the bytes already here (half of it) would
    // have shown as a rate many times the cap.
    let most = rates.iter().max().copied().unwrap_or(0);
    assert!(
        most <= 2 * CAP,
        "a rate of {most} B/s at a cap of {CAP} B/s after resuming with {have} bytes: {rates:?}"
    );
    for e in r.seen_named("progress") {
        assert_eq!(phase(e), "receiving", "{e}");
        assert!(u64_of(e, "files_done") <= u64_of(e, "files_total"), "{e}");
    }
    let last = r.seen_named("progress").last().copied().cloned().unwrap();
    assert_eq!(u64_of(&last, "files_done"), u64_of(&last, "files_total"));
}

#[test]
fn receiver_says_stalled_while_the_sender_is_frozen_and_completes_after() {
    let src = shared_history(48, 7);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    let (mut s, addr, code) = start_sender_with(&old, src, "127.0.0.1:0", &["--limit-rate", LIMIT]);
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    progress_to(&mut r, 0.2);
    signal(s.pid(), "STOP");
    let frozen = Instant::now();
    let stalled = r.wait_event("stalled", Duration::from_secs(10));
    let took = frozen.elapsed();
    signal(s.pid(), "CONT");
    eprintln!("stalled after {took:?}: {stalled}");
    assert!(
        stalled["silent_s"].as_f64().is_some_and(|t| t < 10.0),
        "{stalled}"
    );
    r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    assert_histories_equal(src, &dest).unwrap();
    let rates = rates(&r);
    assert!(
        rates.iter().all(|&b| b <= 2 * CAP),
        "a rate above twice the cap: {rates:?}"
    );
}

/// The `rate_bps` of every progress event `r` printed that has one.
fn rates(r: &Ferry) -> Vec<u64> {
    r.seen_named("progress")
        .iter()
        .filter_map(|e| e["rate_bps"].as_u64())
        .collect()
}
