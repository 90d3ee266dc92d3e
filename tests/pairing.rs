//! A wrong pairing code: the receiver fails with exit 3 and writes nothing; the sender keeps
//! running with a fresh code that then works.

use ferry_testkit::assert_histories_equal;

use crate::util::*;

/// A valid-looking code that differs from `code` in its last digit.
fn wrong(code: &str) -> String {
    let mut c: Vec<char> = code.chars().collect();
    let last = c
        .iter()
        .rposition(|ch| ch.is_ascii_digit())
        .expect("a digit");
    let d = c[last].to_digit(10).expect("digit");
    c[last] = char::from_digit((d + 1) % 10, 10).expect("digit");
    c.into_iter().collect()
}

#[test]
fn wrong_code_exits_3_commits_nothing_and_sender_issues_a_new_code() {
    let src = shared_history(8, 3);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    let (mut s, addr, code) = start_sender(&old, src, "127.0.0.1:0");

    let bad = wrong(&code);
    let mut r = new.receive(&dest, &addr, Some(&bad), &[]);
    r.expect_exit(3, LONG);
    let err = r.seen_named("error");
    assert_eq!(err.len(), 1, "expected one error event: {:?}", r.seen);
    assert_eq!(err[0]["kind"], "pairing");
    assert!(
        !dest.join(".ferry").join("receipt").exists(),
        "a receipt was written after a failed pairing"
    );
    let stray = files_under(&dest);
    assert!(
        stray.is_empty(),
        "files written after a failed pairing: {stray:?}"
    );
    assert!(
        r.seen_named("manifest").is_empty(),
        "a manifest arrived without pairing"
    );

    // The sender is still there, with a new code (the old one is void).
    let again = s.wait_event("listening", LONG);
    let (addr2, code2) = listening(&again);
    assert_ne!(code2, code, "the sender kept the code that was attacked");
    assert!(s.running());

    // The old (correct) code no longer pairs; the new one does and the migration completes.
    let stale = work.path().join("stale");
    let mut r = new.receive(&stale, &addr2, Some(&code), &[]);
    r.expect_exit(3, LONG);
    let code3 = listening(&s.wait_event("listening", LONG)).1;
    let mut r = new.receive(&dest, &addr2, Some(&code3), &[]);
    let done = r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    assert_eq!(s.wait_event("done", LONG)["root"], done["root"]);
    s.expect_exit(0, LONG);
    assert_histories_equal(src, &dest).unwrap();
}
