//! A destination too small for the history is refused before much is written, with a clear
//! message and exit 6; once there is room, the same command finishes. Root only (tmpfs).

use ferry_testkit::assert_histories_equal;

use crate::util::*;

#[test]
fn too_small_destination_is_refused_then_finishes_with_room() {
    if !is_root() {
        eprintln!("skipped: needs root to mount a size-limited tmpfs");
        return;
    }
    let src = shared_history(24, 11);
    let work = tempdir("space");
    let Some(fs) = Tmpfs::mount(&work.path().join("mnt"), "8m") else {
        eprintln!("skipped: mounting tmpfs failed (no privilege in this container?)");
        return;
    };
    let dest = fs.0.join("history");
    let (old, new) = (Device::new("old"), Device::new("new"));
    let (mut s, addr, code) = start_sender(&old, src, "127.0.0.1:0");
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    r.expect_exit(6, LONG);
    let err = &r.seen_named("error")[0];
    assert_eq!(err["kind"], "destination");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("not enough space"), "{msg}");
    // Nothing reached a final path.
    assert!(files_under(&dest)
        .iter()
        .all(|p| p.starts_with(dest.join(".ferry"))));
    assert!(s.running(), "the sender must keep waiting for the receiver");

    fs.resize("64m");
    let mut r = new.receive(&dest, &addr, None, &[]);
    r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    s.expect_exit(0, LONG);
    assert_histories_equal(src, &dest).unwrap();
}
