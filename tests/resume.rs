//! kill -9 of either side at several points; the migration resumes and ends byte-identical,
//! without re-sending much more than what was in flight.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_testkit::assert_histories_equal;
use serde_json::Value;

use crate::util::*;

/// What one receiver interruption may cost on the wire beyond a clean run:
/// - in flight when it dies: the QUIC connection receive window (16 MiB) plus the sender's
///   read-ahead (8 MiB);
/// - verified but not yet committed: the kill lands right after a group commit, but chunks
///   verified while that commit was syncing belong to the next one, which is started every
///   500 ms or 16 MiB (`ReceiverConfig::commit_bytes`), whichever comes first; the allowance
///   keeps twice that, for a commit that was still syncing when the next one filled up.
const IN_FLIGHT_ALLOWANCE: u64 = 24 * MIB;
const ONE_COMMIT: u64 = 32 * MIB;

/// A restarted peer is back in session well before QUIC's idle timeout (20 s): keep-alive 2 s,
/// reconnect backoff at most 3 s.
const RECONNECT_WITHIN: Duration = Duration::from_secs(10);

/// The senders' rate in the kill tests: 160 MiB take ≈ 3.5 s, long enough for every kill point.
const LIMIT: &str = "48MB";

fn journal_len(dest: &Path) -> u64 {
    std::fs::metadata(dest.join(".ferry").join("journal")).map_or(0, |m| m.len())
}

/// Follows progress until `bytes_done >= fraction * total`, then until the receiver's next
/// group commit (its journal at `dest` grows), and returns that progress event, so the kill
/// lands right after a commit: the test then knows what the receiver has claimed as durable.
/// `None` if the migration finished first.
fn wait_progress(r: &mut Ferry, fraction: f64, dest: &Path) -> Option<Value> {
    let deadline = Instant::now() + LONG;
    // Journal length when the fraction was reached, and the latest progress event.
    let mut reached: Option<u64> = None;
    let mut last: Option<Value> = None;
    loop {
        if let Some(len) = reached {
            // The journal starts with a short header; a record is 76 bytes.
            if journal_len(dest) > len.max(64) {
                return last;
            }
        }
        if Instant::now() >= deadline {
            panic!(
                "no progress to {fraction} with a commit in time:\n{}",
                r.stderr()
            );
        }
        let Some(ev) = r.next_event(Duration::from_millis(2)) else {
            if !r.running() {
                panic!("the receiver ended before {fraction}:\n{}", r.stderr());
            }
            continue;
        };
        match ev["event"].as_str() {
            Some("progress") => {
                let (done, total) = (u64_of(&ev, "bytes_done"), u64_of(&ev, "bytes_total"));
                if done as f64 >= fraction * total as f64 && reached.is_none() {
                    reached = Some(journal_len(dest));
                }
                last = Some(ev);
            }
            Some("done") => return None,
            Some("error") => panic!("receiver error: {ev}\n{}", r.stderr()),
            _ => {}
        }
    }
}

#[test]
fn receiver_killed_at_several_points_resumes_byte_identical() {
    let src = shared_history(160, 7);
    // The reference: what a clean run puts on the wire.
    let clean = migrate(src);
    let clean_wire = u64_of(&clean.send_done, "wire_bytes");
    let clean_root = clean.recv_done["root"].clone();
    drop(clean);

    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    // Rate-limited, so that every kill point is reached however fast the machine is (at full
    // speed the 160 MiB took 0.6 s in a CI run: fewer progress events than kill points).
    let (mut s, addr, code) = start_sender_with(&old, src, "127.0.0.1:0", &["--limit-rate", LIMIT]);

    // Each kill lands right after a group commit following the given fraction of progress;
    // 1.0 = after the last commit, while finalize (verify, rename, receipt) runs.
    let kill_points = [0.10, 0.40, 0.80, 1.0];
    // Bytes the receiver reported at each kill, and what each attempt resumed with.
    let (mut killed_at, mut resumed) = (Vec::new(), Vec::new());
    let had = |r: &Ferry| {
        r.seen_named("resumed")
            .first()
            .map_or(0, |e| u64_of(e, "bytes_have"))
    };
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    for &at in &kill_points {
        let t = Instant::now();
        if !killed_at.is_empty() {
            // The sender drops the dead receiver's session for the new connection at once,
            // instead of waiting for its idle timeout.
            r.wait_event("manifest", LONG);
            let took = t.elapsed();
            assert!(
                took < RECONNECT_WITHIN,
                "the restarted receiver waited {took:?} to be served"
            );
        }
        let Some(ev) = wait_progress(&mut r, at, &dest) else {
            eprintln!("kill point {at}: the migration finished first");
            break;
        };
        r.kill9();
        let (done, total) = (u64_of(&ev, "bytes_done"), u64_of(&ev, "bytes_total"));
        resumed.push(had(&r));
        killed_at.push(done);
        eprintln!(
            "attempt {}: resumed with {} bytes; killed right after a commit (last progress event {done} of {total} bytes, {:.0}%), {:.1} s after start",
            killed_at.len(),
            had(&r),
            100.0 * done as f64 / total as f64,
            t.elapsed().as_secs_f64()
        );
        assert!(
            s.running(),
            "the sender stopped after a receiver was killed:\n{}",
            s.stderr()
        );
        assert!(
            at >= 1.0 || !dest.join(".ferry").join("receipt").exists(),
            "a receipt exists before the migration completed"
        );
        // The same command again (every other time literally, with the used-up code; otherwise
        // without it): either way it reconnects by the pinned key.
        let again = (killed_at.len() % 2 == 1).then_some(code.as_str());
        r = new.receive(&dest, &addr, again, &[]);
    }
    let t = Instant::now();
    let recv_done = match r.seen_named("done").first() {
        Some(d) => (*d).clone(),
        None => r.wait_event("done", LONG),
    };
    r.expect_exit(0, LONG);
    resumed.push(had(&r));
    let send_done = s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    eprintln!(
        "last attempt: resumed with {} bytes, {:.1} s to done, {} wire bytes",
        had(&r),
        t.elapsed().as_secs_f64(),
        recv_done["wire_bytes"]
    );
    assert_eq!(send_done["root"], recv_done["root"]);
    assert_eq!(send_done["root"], clean_root);
    assert_histories_equal(src, &dest).unwrap();
    let (code, err) = verify(&dest);
    assert_eq!(code, 0, "ferry verify failed: {err}");

    let n = killed_at.len();
    assert!(n >= 3, "only {n} kill points were reached");
    // Each kill came right after a commit: the next attempt keeps more than the last one did.
    for i in 0..n {
        assert!(
            resumed[i + 1] > resumed[i],
            "attempt {} resumed with {} bytes, no more than attempt {} ({}): committed data was lost",
            i + 2,
            resumed[i + 1],
            i + 1,
            resumed[i]
        );
    }
    let total_wire = u64_of(&send_done, "wire_bytes");
    let extra = total_wire.saturating_sub(clean_wire);
    let bound = clean_wire + n as u64 * (IN_FLIGHT_ALLOWANCE + ONE_COMMIT);
    eprintln!(
        "receiver kills: {n}; resumed with {resumed:?} bytes; wire bytes over all attempts {total_wire} \
         vs clean {clean_wire}: +{:.1} MiB in all, {:.1} MiB per interruption (allowed {} MiB); bound {bound}",
        extra as f64 / MIB as f64,
        extra as f64 / n as f64 / MIB as f64,
        (IN_FLIGHT_ALLOWANCE + ONE_COMMIT) / MIB
    );
    assert!(
        total_wire <= bound,
        "resuming re-sent too much: {total_wire} wire bytes over all attempts, clean run {clean_wire}, \
         allowed {} MiB per interruption x {n}",
        (IN_FLIGHT_ALLOWANCE + ONE_COMMIT) / MIB
    );
}

#[test]
fn sender_killed_at_several_points_receiver_reconnects_by_itself() {
    let src = shared_history(160, 7);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    // No --listen, as people run it: the sender listens on every address, and a restarted
    // sender takes the port it used last time (noted in its state folder), so it is where the
    // receiver knows it. The test connects over loopback only.
    let send = |old: &Device| {
        let mut s = old.spawn(
            "send",
            [
                "send".as_ref(),
                src.as_os_str(),
                "--no-mdns".as_ref(),
                "--json".as_ref(),
                "--limit-rate".as_ref(),
                LIMIT.as_ref(),
            ],
        );
        let ev = s.wait_event("listening", LONG);
        let (any, code) = listening(&ev);
        let port: u16 = any
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port");
        (s, port, code)
    };
    let (mut s, port, code) = send(&old);
    let addr = format!("127.0.0.1:{port}");
    let first_manifest = s.seen_named("manifest")[0].clone();
    let files = u64_of(&first_manifest, "files");
    let mut r = new.receive(&dest, &addr, Some(&code), &["--give-up-after", "120"]);
    let mut kills = 0u64;
    for &at in &[0.15, 0.50, 0.85] {
        let Some(ev) = wait_progress(&mut r, at, &dest) else {
            eprintln!("kill point {at}: the migration finished first");
            break;
        };
        s.kill9();
        kills += 1;
        eprintln!(
            "sender killed at {} of {} bytes ({:.0}%)",
            u64_of(&ev, "bytes_done"),
            u64_of(&ev, "bytes_total"),
            100.0 * u64_of(&ev, "bytes_done") as f64 / u64_of(&ev, "bytes_total") as f64
        );
        assert!(
            r.running(),
            "the receiver gave up when the sender died:\n{}",
            r.stderr()
        );
        // Same command, same FERRY_HOME: same identity, so the receiver's pinned key still
        // matches, the hash cache from the first scan is reused, and the port is the last one.
        let t = Instant::now();
        let (s2, port2, _) = send(&old);
        s = s2;
        assert_eq!(port2, port, "the restarted sender listens on another port");
        let m = s.seen_named("manifest")[0].clone();
        let scan_s = t.elapsed().as_secs_f64();
        eprintln!(
            "restarted sender: manifest after {scan_s:.2} s, {} files from the hash cache, {} bytes hashed",
            m["cached_files"], m["hashed_bytes"]
        );
        assert_eq!(
            m["root"], first_manifest["root"],
            "the restarted sender scanned another tree"
        );
        assert_eq!(
            u64_of(&m, "cached_files"),
            files,
            "the restarted sender did not take every file from its hash cache: {m}"
        );
        assert_eq!(
            u64_of(&m, "hashed_bytes"),
            0,
            "the restarted sender re-hashed: {m}"
        );
        // The receiver finds the new sender by itself (stateless reset, then reconnect)…
        // unless it already had every byte and finished without it.
        if r.seen_named("done").is_empty() {
            s.wait_event("paired", Duration::from_secs(60));
            let took = t.elapsed().as_secs_f64() - scan_s;
            eprintln!("receiver reconnected {took:.2} s after the sender restarted");
            // The restarted sender resets the stale connection (stateless reset, same key and
            // port): the receiver must not sit out its 20 s idle timeout.
            assert!(
                took < RECONNECT_WITHIN.as_secs_f64(),
                "the receiver took {took:.1} s to find the restarted sender"
            );
            // Progress from here on is this session's (the receiver may still have been
            // writing what the killed sender had sent).
            if r.wait_any(&["resumed", "done"], LONG)["event"] == "done" {
                break;
            }
        }
    }
    let recv_done = match r.seen_named("done").first() {
        Some(d) => (*d).clone(),
        None => r.wait_event("done", LONG),
    };
    r.expect_exit(0, LONG);
    let send_done = s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    assert!(kills >= 2, "only {kills} kill points were reached");
    assert_eq!(send_done["root"], recv_done["root"]);
    assert_eq!(recv_done["root"], first_manifest["root"]);
    assert_histories_equal(src, &dest).unwrap();
    let (code, err) = verify(&dest);
    assert_eq!(code, 0, "ferry verify failed: {err}");
    let interruptions = r.seen_named("interrupted").len();
    let wire = u64_of(&recv_done, "wire_bytes");
    let bytes = u64_of(&recv_done, "bytes");
    eprintln!(
        "sender kills: {kills}; receiver saw {interruptions} interruptions; received {wire} wire bytes in all for a {bytes}-byte history"
    );
    assert!(
        wire <= bytes + kills * IN_FLIGHT_ALLOWANCE,
        "the receiver took {wire} wire bytes for {bytes} bytes of history"
    );
}

#[test]
fn resumed_receiver_waits_for_a_sender_that_is_not_back_yet() {
    let src = shared_history(32, 9);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let (mut s, addr, code) = start_sender_with(&old, src, &listen, &["--limit-rate", "8MB"]);
    let mut r = new.receive(&dest, &addr, Some(&code), &["--give-up-after", "120"]);
    wait_progress(&mut r, 0.3, &dest).expect("the migration finished before 30%");
    // Both devices go down (a power cut); the new one comes back first.
    s.kill9();
    r.kill9();
    r.wait_exit(LONG);
    let mut r = new.receive(&dest, &addr, None, &["--give-up-after", "120"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        r.running(),
        "the resumed receiver gave up on a sender that is not back yet:\n{}",
        r.stderr()
    );
    // The old device comes back: same FERRY_HOME and port, same key.
    let mut s = old.send(src, &listen, &[]);
    s.wait_event("listening", LONG);
    r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    assert_histories_equal(src, &dest).unwrap();
}

#[test]
fn restarted_receiver_of_a_finished_migration_says_done_without_the_sender() {
    let src = shared_history(8, 3);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    let (addr, _, _) = migrate_between(&old, &new, src, &dest);
    // As after a receiver killed once it had confirmed the last round: the sender finished
    // and is gone; the same receive command again finds the finished migration.
    let mut r = new.receive(&dest, &addr, None, &[]);
    let done = r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    assert_eq!(done["end"], "complete", "{done}");
    assert_histories_equal(src, &dest).unwrap();
}

/// A sender restarted in the middle of a migration whose receiver is paired does not lead with
/// a new code and QR nobody needs: it says it waits for that device, by name, and offers the
/// code only for another device. The receiver reconnects by its key and finishes; a sender
/// started for the same folder afterwards offers the code as usual (issue 18, item 10).
#[test]
fn restarted_sender_waits_for_its_paired_receiver_by_name_instead_of_showing_a_new_code() {
    let src = shared_history(32, 30);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let (mut s, _, code) = start_sender_with(&old, src, &addr, &["--limit-rate", "8MiB"]);
    let mut r = new.receive(&dest, &addr, Some(&code), &["--name", "New phone"]);
    assert!(
        wait_progress(&mut r, 0.2, &dest).is_some(),
        "finished too early"
    );
    s.kill9();
    // The same command, for a person (no --json).
    let args: Vec<std::ffi::OsString> = vec![
        "send".into(),
        src.into(),
        "--listen".into(),
        addr.clone().into(),
        "--no-mdns".into(),
    ];
    let mut s = old.spawn("send", args);
    let deadline = Instant::now() + LONG;
    while !s.stderr().contains("to migrate to another device instead") {
        assert!(Instant::now() < deadline, "{}", s.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    s.expect_exit(0, LONG);
    assert_histories_equal(src, &dest).unwrap();
    let said = s.stderr();
    let waiting = said
        .lines()
        .position(|l| l.starts_with("waiting for New phone (") && l.contains("no code needed"))
        .unwrap_or_else(|| panic!("no waiting line:\n{said}"));
    let other = said
        .lines()
        .position(|l| l.starts_with("to migrate to another device instead: pairing code "))
        .unwrap_or_else(|| panic!("no secondary code:\n{said}"));
    assert!(waiting < other, "{said}");
    assert!(!said.contains("pairing code: "), "led with a code:\n{said}");
    assert!(!said.contains('█'), "showed a QR code:\n{said}");
    assert!(!said.contains("on the new device run"), "{said}");
    assert!(!said.contains("[127."), "{said}");
    // Finished: the next sender for this folder waits for nobody.
    let (s, _, _) = start_sender(&old, src, &addr);
    let listening = s.seen_named("listening")[0].clone();
    assert!(listening.get("waiting_for").is_none(), "{listening}");
    s.interrupt();
}

/// A person's receiver whose stderr is a file (no terminal: the progress bar is hidden) still
/// shows what happens when the sender dies mid-transfer, in plain words: "connection lost"
/// once (not "connection lost (the connection was lost: connection lost)"), then reconnected
/// and resuming; its log lines (-v) carry no colour codes and no Rust list brackets around
/// addresses (issue 18, item 10).
#[test]
fn receiver_without_a_terminal_says_the_link_was_lost_plainly_without_colour_codes() {
    let src = shared_history(16, 31);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let (mut s, _, code) = start_sender_with(&old, src, &addr, &["--limit-rate", "4MiB"]);
    let args: Vec<std::ffi::OsString> = vec![
        "receive".into(),
        dest.clone().into(),
        "--connect".into(),
        addr.clone().into(),
        "--code".into(),
        code.into(),
    ];
    // Log lines from ferry's own crates, as `-v` shows them (and more).
    let log = [(
        "FERRY_LOG",
        "ferry_migrate=debug,ferry_sync=debug,ferry_transport=debug",
    )];
    let mut r = Ferry::spawn_opts("receive", new.home.path(), &[], &log, false, args);
    let deadline = Instant::now() + LONG;
    while journal_len(&dest) <= 64 {
        assert!(
            Instant::now() < deadline,
            "nothing committed:\n{}",
            r.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s.kill9();
    let (mut s, _, _) = start_sender(&old, src, &addr);
    r.expect_exit(0, LONG);
    s.expect_exit(0, LONG);
    assert_histories_equal(src, &dest).unwrap();
    let err = r.stderr();
    let said: Vec<&str> = err.lines().filter(|l| !l.contains(" DEBUG ")).collect();
    let lost: Vec<&str> = said
        .iter()
        .copied()
        .filter(|l| l.contains("lost"))
        .collect();
    assert_eq!(lost, ["connection lost; reconnecting…"], "{err}");
    assert!(said.contains(&"reconnected"), "{err}");
    assert!(said.iter().any(|l| l.starts_with("resuming: ")), "{err}");
    assert!(err.contains(" DEBUG "), "no log lines:\n{err}");
    assert!(!err.contains('\u{1b}'), "colour codes:\n{err:?}");
    assert!(!err.contains("[127.0.0.1"), "list brackets:\n{err}");
}

/// Receiving again into a folder that holds a finished migration, with the sender gone: the
/// person is told at once that the folder holds a finished migration (never that it resumes
/// an unfinished one), and the end says nothing needed to be received, not "0 B received at
/// 0 B/s" (issue 18, item 10).
#[test]
fn receiving_again_into_a_finished_folder_says_so_and_never_that_it_resumes() {
    let src = shared_history(4, 32);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    let (addr, _, _) = migrate_between(&old, &new, src, &dest);
    let args: Vec<std::ffi::OsString> = vec![
        "receive".into(),
        dest.clone().into(),
        "--connect".into(),
        addr.into(),
    ];
    let (code, r) = new.run("receive", args, LONG);
    let err = r.stderr();
    assert_eq!(code, 0, "{err}");
    assert!(
        err.starts_with("this folder already holds a finished migration"),
        "{err}"
    );
    for wrong in ["unfinished", "resuming", "0 B/s"] {
        assert!(!err.contains(wrong), "{wrong:?} in:\n{err}");
    }
    let done = err
        .lines()
        .find(|l| l.starts_with("done: "))
        .unwrap_or_default();
    assert!(done.contains("nothing needed to be received"), "{err}");
    assert_histories_equal(src, &dest).unwrap();
}

/// Finalize reads nothing back that the receiving process verified and made durable itself:
/// `read_back_bytes` is 0 for a run without interruption, every byte with `--verify-at-end`,
/// and after a `kill -9` the files the killed process had journaled (some, not all), so data
/// staged while no receiver guarded it is re-hashed before it moves into place.
#[test]
fn finalize_reads_back_only_what_an_earlier_process_journaled() {
    let src = shared_history(160, 7);
    let clean = migrate(src);
    let bytes = u64_of(&clean.recv_done, "bytes");
    assert_eq!(u64_of(&clean.recv_done, "read_back_bytes"), 0);
    assert_histories_equal(src, &clean.dest).unwrap();
    drop(clean);

    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    let (mut s, addr, code) = start_sender(&old, src, "127.0.0.1:0");
    let mut r = new.receive(&dest, &addr, Some(&code), &["--verify-at-end"]);
    let done = r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    assert_eq!(u64_of(&done, "read_back_bytes"), bytes, "{done}");
    assert_histories_equal(src, &dest).unwrap();

    let work = tempdir("dest");
    let dest = work.path().join("history");
    let (mut s, addr, code) = start_sender_with(&old, src, "127.0.0.1:0", &["--limit-rate", LIMIT]);
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    wait_progress(&mut r, 0.5, &dest).expect("the migration finished before half of it");
    r.kill9();
    let mut r = new.receive(&dest, &addr, None, &[]);
    let done = r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    let read_back = u64_of(&done, "read_back_bytes");
    let resumed = u64_of(&done, "resumed_bytes");
    eprintln!("resumed with {resumed} of {bytes} bytes; read back {read_back}");
    assert!(
        resumed > 0 && read_back >= resumed && read_back < bytes,
        "read back {read_back} bytes after resuming with {resumed} of {bytes}: {done}"
    );
    assert_histories_equal(src, &dest).unwrap();
    let (code, err) = verify(&dest);
    assert_eq!(code, 0, "ferry verify failed: {err}");
}
