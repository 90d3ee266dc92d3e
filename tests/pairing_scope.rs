//! What a pairing authorizes (issue 14, finding 1), attacked through the real binary: a pinned
//! key is honoured without a code only in the direction it was paired for, only by the device
//! `ferry send --to` names, only until it expires, and never after `ferry peers --forget` (even
//! in a sender that was already running, and even after that sender writes the peers file).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use ferry_testkit::assert_histories_equal;
use serde_json::Value;

use crate::util::*;

const DAY: u64 = 86_400;

fn peers_file(d: &Device) -> PathBuf {
    d.home.path().join("config").join("peers.json")
}

fn read_peers(d: &Device) -> Value {
    let bytes = std::fs::read(peers_file(d)).expect("read peers.json");
    serde_json::from_slice(&bytes).expect("peers.json is JSON")
}

/// Rewrites this device's peers.json with `edit` applied to every record.
fn edit_peers(d: &Device, edit: impl Fn(&mut Value)) {
    let mut v = read_peers(d);
    for p in v["peers"].as_array_mut().expect("peers") {
        edit(p);
    }
    std::fs::write(peers_file(d), serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn peer_ids(d: &Device) -> Vec<String> {
    read_peers(d)["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| p["device_id"].as_str().expect("id").to_string())
        .collect()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `from` sends `src` to `to` (named `to_name`) with the code; both exit 0. Returns the
/// receiver's device id as the sender saw it.
fn pair_by_migrating(from: &Device, to: &Device, to_name: &str, src: &Path, dest: &Path) -> String {
    let (mut s, addr, code) = start_sender(from, src, "127.0.0.1:0");
    let mut r = to.receive(dest, &addr, Some(&code), &["--name", to_name]);
    r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    let paired = s.wait_event("paired", LONG);
    assert_eq!(paired["newly_paired"], true);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    paired["device_id"].as_str().expect("device id").to_string()
}

/// A receiver run that must fail pairing (exit 3, a `pairing` error) and write nothing.
fn expect_refused(r: &mut Ferry, dest: &Path) -> String {
    r.expect_exit(3, LONG);
    let err = r.seen_named("error");
    assert_eq!(err.len(), 1, "expected one error event: {:?}", r.seen);
    assert_eq!(err[0]["kind"], "pairing", "{:?}", r.seen);
    assert!(
        r.seen_named("manifest").is_empty(),
        "data flowed: {:?}",
        r.seen
    );
    assert!(r.seen_named("paired").is_empty(), "admitted: {:?}", r.seen);
    let stray = files_under(dest);
    assert!(stray.is_empty(), "files written: {stray:?}");
    err[0]["message"].as_str().unwrap_or_default().to_string()
}

/// A paired once as the sender to B. Later B sends its own history; A (who has no code) must
/// not receive it: its own binary refuses to use the pinning backwards, and a doctored binary
/// (A's peers file edited to claim B as a sender) is refused by B. B keeps waiting and its
/// real receiver, with the code, gets the history.
#[test]
fn a_pairing_does_not_authorize_the_reverse_direction() {
    let (a, b, c) = (Device::new("a"), Device::new("b"), Device::new("c"));
    let work = tempdir("scope-rev");
    let a_src = shared_history(4, 21);
    pair_by_migrating(&a, &b, "b", a_src, &work.path().join("b-got"));

    let b_src = shared_history(4, 22);
    let (mut bs, addr, code) = start_sender(&b, b_src, "127.0.0.1:0");

    // A's own binary: its pinning of B is for sending to B only.
    let stolen = work.path().join("stolen");
    let mut r = a.receive(&stolen, &addr, None, &[]);
    let msg = expect_refused(&mut r, &stolen);
    assert!(
        msg.contains("paired as a receiver of this device, not as a sender"),
        "{msg}"
    );

    // A doctored A that claims B may send to it: B refuses the key (it paired A as a sender).
    edit_peers(&a, |p| p["role"] = "sender".into());
    let mut r = a.receive(&stolen, &addr, None, &[]);
    let msg = expect_refused(&mut r, &stolen);
    assert!(msg.contains("not paired"), "{msg}");

    // B was never told of A, still waits, and its code still works for the real receiver.
    assert!(bs.running());
    assert!(bs.seen_named("paired").is_empty(), "{:?}", bs.seen);
    let dest = work.path().join("c-got");
    let mut r = c.receive(&dest, &addr, Some(&code), &[]);
    let done = r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    assert_eq!(bs.wait_event("done", LONG)["root"], done["root"]);
    bs.expect_exit(0, LONG);
    assert_histories_equal(b_src, &dest).unwrap();
    assert!(files_under(&stolen).is_empty());
}

/// `ferry send --to B` serves B by its pinned key (saying who and since when before any data)
/// and refuses C, another pinned receiver, which gets a clear error and nothing.
#[test]
fn send_to_serves_only_the_named_peer() {
    let (a, b, c) = (Device::new("a"), Device::new("b"), Device::new("c"));
    let work = tempdir("scope-to");
    let src = shared_history(4, 23);
    let b_id = pair_by_migrating(&a, &b, "phone-b", src, &work.path().join("b1"));
    pair_by_migrating(&a, &c, "phone-c", src, &work.path().join("c1"));

    // An unknown name is a usage error, before anything listens.
    let args: Vec<OsString> = vec![
        "send".into(),
        src.into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--no-mdns".into(),
        "--json".into(),
        "--to".into(),
        "nobody".into(),
    ];
    let (code, f) = a.run("send", args, LONG);
    assert_eq!(code, 2, "{}", f.stderr());
    assert!(f.seen_named("listening").is_empty());

    let (mut s, addr, _code) = start_sender_with(&a, src, "127.0.0.1:0", &["--to", "phone-b"]);
    let c_dest = work.path().join("c2");
    let mut r = c.receive(&c_dest, &addr, None, &[]);
    let msg = expect_refused(&mut r, &c_dest);
    assert!(msg.contains("serving only another paired device"), "{msg}");
    assert!(s.running());
    assert!(s.seen_named("paired").is_empty(), "{:?}", s.seen);

    let paired_at = read_peers(&a)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["device_id"] == b_id.as_str())
        .expect("B in A's peers")["paired_at"]
        .clone();
    let b_dest = work.path().join("b2");
    let mut r = b.receive(&b_dest, &addr, None, &[]);
    let paired = s.wait_event("paired", LONG);
    assert_eq!(paired["device_id"], b_id.as_str());
    assert_eq!(paired["peer"], "phone-b");
    assert_eq!(paired["newly_paired"], false);
    assert_eq!(paired["role"], "receiver");
    assert_eq!(paired["paired_at"], paired_at);
    let done = r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    assert_eq!(s.wait_event("done", LONG)["root"], done["root"]);
    s.expect_exit(0, LONG);
    assert_histories_equal(src, &b_dest).unwrap();
}

/// A pairing unused for longer than the lifetime (30 days by default) needs the code again:
/// checked by the sender (its record of the receiver is old) and by the receiver (its record
/// of the sender is old). With the code, it pairs again and completes.
#[test]
fn an_expired_pairing_needs_a_code_again() {
    let (a, b) = (Device::new("a"), Device::new("b"));
    let work = tempdir("scope-ttl");
    let src = shared_history(4, 24);
    pair_by_migrating(&a, &b, "b", src, &work.path().join("first"));
    let old = now() - 31 * DAY;
    let age = |p: &mut Value| {
        p["paired_at"] = old.into();
        p["last_used"] = old.into();
    };

    // The sender's record of B is 31 days old: B's key alone no longer gets in.
    edit_peers(&a, age);
    let (mut s, addr, code) = start_sender(&a, src, "127.0.0.1:0");
    let dest = work.path().join("second");
    let mut r = b.receive(&dest, &addr, None, &[]);
    let msg = expect_refused(&mut r, &dest);
    assert!(msg.contains("not paired"), "{msg}");
    assert!(s.running());
    // A longer --pairing-ttl on the sender would have admitted it; here the code re-pairs.
    let mut r = b.receive(&dest, &addr, Some(&code), &[]);
    let paired = r.wait_event("paired", LONG);
    assert_eq!(paired["newly_paired"], true);
    r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    assert_histories_equal(src, &dest).unwrap();

    // The receiver's record of A is old: it does not even try the key...
    edit_peers(&b, age);
    let (mut s, addr, _code) = start_sender(&a, src, "127.0.0.1:0");
    let third = work.path().join("third");
    let mut r = b.receive(&third, &addr, None, &[]);
    let msg = expect_refused(&mut r, &third);
    assert!(msg.contains("expired"), "{msg}");
    // ...unless told pairings last longer.
    let mut r = b.receive(&third, &addr, None, &["--pairing-ttl", "60"]);
    assert_eq!(r.wait_event("paired", LONG)["newly_paired"], false);
    r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    assert_histories_equal(src, &third).unwrap();
}

/// `ferry peers --forget B` while A's sender runs: B is refused at once, and when the sender
/// later writes peers.json (pairing C with the code), B does not come back.
#[test]
fn forget_while_a_sender_runs_takes_effect_at_once_and_is_not_undone() {
    let (a, b, c) = (Device::new("a"), Device::new("b"), Device::new("c"));
    let work = tempdir("scope-forget");
    let src = shared_history(4, 25);
    let b_id = pair_by_migrating(&a, &b, "b", src, &work.path().join("b1"));

    let (mut s, addr, code) = start_sender(&a, src, "127.0.0.1:0");
    let (rc, f) = a.run(
        "peers",
        ["peers", "--forget", b_id.as_str(), "--json"],
        LONG,
    );
    assert_eq!(rc, 0, "{}", f.stderr());
    assert!(!peer_ids(&a).contains(&b_id));

    let b_dest = work.path().join("b2");
    let mut r = b.receive(&b_dest, &addr, None, &[]);
    let msg = expect_refused(&mut r, &b_dest);
    assert!(msg.contains("not paired"), "{msg}");
    assert!(s.running());

    // The running sender now writes peers.json (it pairs C and notes its use).
    let c_dest = work.path().join("c1");
    let mut r = c.receive(&c_dest, &addr, Some(&code), &["--name", "c"]);
    let c_id = s.wait_event("paired", LONG)["device_id"]
        .as_str()
        .unwrap()
        .to_string();
    r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    let ids = peer_ids(&a);
    assert_eq!(ids, vec![c_id], "B came back or C is missing");
}
