//! `ferry demo` end to end, and usage errors (exit 2).

use std::ffi::OsString;

use crate::util::*;

#[test]
fn demo_migrates_and_verifies() {
    let work = tempdir("demo");
    let dir = work.path().join("demo");
    let d = Device::new("demo");
    let args: Vec<OsString> = vec![
        "demo".into(),
        "--size".into(),
        "8MiB".into(),
        "--dir".into(),
        dir.clone().into(),
        "--json".into(),
    ];
    let (code, f) = d.run("demo", args, LONG);
    assert_eq!(code, 0, "demo failed:\n{}", f.stderr());
    let ev = f.seen_named("demo")[0].clone();
    assert_eq!(ev["verified"], true);
    assert!(
        ev["interruptions"].as_u64().unwrap_or(0) >= 1,
        "the demo did not cut the link: {ev}"
    );
    let dest = dir.join("new-phone").join("chat-history");
    ferry_testkit::assert_histories_equal(&dir.join("old-phone").join("chat-history"), &dest)
        .unwrap();
    let (code, err) = verify(&dest);
    assert_eq!(code, 0, "ferry verify of the demo failed: {err}");
}

#[test]
fn usage_errors_exit_2() {
    let d = Device::new("usage");
    let work = tempdir("usage");
    let dest = work.path().join("dest");
    let dest_s = dest.to_str().unwrap();
    let cases: &[&[&str]] = &[
        // Not a pairing code.
        &[
            "receive",
            dest_s,
            "--connect",
            "127.0.0.1:9",
            "--code",
            "12-ab",
        ],
        &[
            "receive",
            dest_s,
            "--connect",
            "127.0.0.1:9",
            "--code",
            "123456789",
        ],
        &["send", dest_s, "--no-mdns", "--code", "hello"],
        // --connect and --ticket together.
        &[
            "receive",
            dest_s,
            "--connect",
            "127.0.0.1:9",
            "--ticket",
            "x",
        ],
        // Not an address; not a ticket; no such command; missing argument.
        &[
            "receive",
            dest_s,
            "--connect",
            "no port here",
            "--code",
            "1234-5678",
        ],
        &["receive", dest_s, "--ticket", "not-a-ticket"],
        &["teleport"],
        &["receive"],
        &["demo", "--size", "lots", "--dir", dest_s],
    ];
    for args in cases {
        let (code, f) = d.run("usage", args.iter().copied(), LONG);
        assert_eq!(
            code,
            2,
            "ferry {args:?} exited {code}, not 2:\n{}",
            f.stderr()
        );
        assert!(!dest.exists(), "ferry {args:?} created the destination");
    }
}

/// `ferry verify` on a folder no migration finished in is a usage error (exit 2) that says
/// so, not an integrity failure (exit 7) like a tampered copy.
#[test]
fn verify_of_a_folder_without_a_migration_is_exit_2_not_7() {
    let work = tempdir("verify");
    std::fs::write(work.path().join("notes.txt"), b"mine").unwrap();
    let (code, err) = verify(work.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not hold a completed migration"), "{err}");
    // A folder that is not there is said to be missing, not to lack a receipt.
    let (code, err) = verify(&work.path().join("typo"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("typo does not exist"), "{err}");
}

/// A sender that is not announced on the local network (`--no-mdns`) tells the person the
/// forms that can reach it (the ticket, or its address), not the mDNS one.
#[test]
fn a_sender_without_mdns_shows_the_ticket_and_address_forms() {
    let src = shared_history(4, 27);
    let old = Device::new("old");
    let args: Vec<OsString> = vec![
        "send".into(),
        src.into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--no-mdns".into(),
    ];
    let s = old.spawn("send", args);
    let deadline = std::time::Instant::now() + LONG;
    let hint = loop {
        let err = s.stderr();
        if let Some(l) = err
            .lines()
            .find(|l| l.starts_with("on the new device run:"))
        {
            break l.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no hint:\n{err}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        hint.contains("--ticket -") && hint.contains("--connect 127.0.0.1:"),
        "{hint}"
    );
    assert!(!hint.contains("(and type the code), or"), "{hint}");
}

/// Every flag each command's `--help` lists is in the README's command contract, and no help
/// line says the same sentence twice (a merge once doubled `--json`'s line on `send`).
#[test]
fn every_flag_in_help_is_in_the_readme_and_each_help_line_says_it_once() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    for cmd in [
        "send", "receive", "pair", "peers", "verify", "doctor", "demo",
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([cmd, "--help"])
            .output()
            .expect("ferry --help");
        assert!(out.status.success(), "ferry {cmd} --help failed");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        for line in text.lines().map(str::trim_start) {
            let Some(flag) = line
                .split_whitespace()
                .find(|w| w.starts_with("--"))
                .map(|w| w.trim_end_matches([',', '.']))
                .filter(|_| line.starts_with('-'))
            else {
                continue;
            };
            let flag = flag.split(['=', '.']).next().unwrap_or(flag);
            if ["--help", "--verbose"].contains(&flag) {
                continue;
            }
            assert!(
                readme.contains(flag),
                "ferry {cmd} {flag} is not in the README's contract"
            );
            let sentences: Vec<&str> = line
                .split(". ")
                .map(|s| s.trim().trim_end_matches('.'))
                .filter(|s| s.len() > 10)
                .collect();
            for (i, s) in sentences.iter().enumerate() {
                assert!(
                    !sentences[i + 1..].contains(s),
                    "ferry {cmd} --help says {s:?} twice: {line}"
                );
            }
        }
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--help")
        .output()
        .expect("ferry --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("10 incomplete"), "exit 10 missing: {text}");
    // `--yes` says what the README says: nothing deleted, same paths replaced.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["receive", "--help"])
        .output()
        .expect("ferry receive --help");
    let text = String::from_utf8_lossy(&out.stdout);
    let yes = text
        .split("--yes")
        .nth(1)
        .and_then(|t| t.split("\n      -").next())
        .unwrap_or_default();
    assert!(
        yes.contains("never deletes") && yes.contains("replaces files at the same paths"),
        "--yes: {yes}"
    );
}

/// `ferry demo` of an 8 MiB history with `extra` flags: asserts exit 0, returns its stderr.
fn small_demo(extra: &[&str]) -> String {
    let work = tempdir("demo");
    let d = Device::new("demo");
    let dir = work.path().join("demo");
    let mut args: Vec<OsString> = vec![
        "demo".into(),
        "--size".into(),
        "8MiB".into(),
        "--dir".into(),
        dir.into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    let (code, f) = d.run("demo", args, LONG);
    let err = f.stderr();
    assert_eq!(code, 0, "{err}");
    err
}

/// The demo on a person's screen: what the generator wrote against what the manifest holds is
/// explained; what crossed the link, what the cut made send again, and what dedup and
/// compression saved are told apart (a total above the history's size read as negative
/// savings); sizes in binary units (issue 18, item 10).
#[test]
fn demo_summary_tells_apart_what_crossed_what_the_cut_resent_and_what_was_saved() {
    let err = small_demo(&[]);
    assert!(
        err.contains("databases' -wal files travel inside their consistent snapshots"),
        "{err}"
    );
    let story = err
        .lines()
        .find(|l| l.contains("crossed the link"))
        .unwrap_or_else(|| panic!("no summary of the bytes:\n{err}"));
    for part in [
        "of unique data (dedup of identical files saved ",
        "; compression saved ",
    ] {
        assert!(story.contains(part), "{story}");
    }
    assert!(
        story.contains("sent again (in flight when a link was lost)")
            || story.contains("nothing was sent twice"),
        "{story}"
    );
    assert!(
        !err.contains("MB/s") && !err.contains(" MB"),
        "decimal units:\n{err}"
    );
    assert!(err.contains("MiB/s"), "{err}");
}

/// `ferry demo --no-interrupt` cuts nothing and says nothing about a cut.
#[test]
fn demo_without_interrupt_never_mentions_a_cut() {
    let err = small_demo(&["--no-interrupt"]);
    assert!(err.contains("crossed the link"), "{err}");
    assert!(!err.contains("cut"), "{err}");
}

/// A sender stopped (Ctrl-C) before any receiver came says nothing was sent, and does not
/// promise to "continue where it left off" (issue 18, item 10).
#[test]
fn sender_stopped_before_any_receiver_says_nothing_was_sent() {
    let src = shared_history(4, 33);
    let old = Device::new("old");
    let args: Vec<OsString> = vec![
        "send".into(),
        src.into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--no-mdns".into(),
    ];
    let mut s = old.spawn("send", args);
    let deadline = std::time::Instant::now() + LONG;
    while !s.stderr().contains("pairing code: ") {
        assert!(std::time::Instant::now() < deadline, "{}", s.stderr());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    s.interrupt();
    let code = s.wait_code(LONG);
    let err = s.stderr();
    assert_eq!(code, 5, "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert_eq!(
        last, "ferry: stopped before any device connected; nothing was sent",
        "{err}"
    );
    assert!(
        !err.contains("left off") && !err.contains("continue"),
        "{err}"
    );
}
