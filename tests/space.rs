//! A destination too small for the history is refused before much is written, with a clear
//! message and exit 6; once there is room, the same command finishes. Root only (tmpfs).

use ferry_testkit::{assert_histories_equal, assert_trees_equal};

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

/// Random (incompressible) bytes, so that tmpfs usage is what the test expects.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Each catch-up round checks free space against what that round still needs (not the whole
/// history): a small catch-up fits where the whole history would not; one that does not fit
/// stops with exit 6 before writing, keeping the verified tree; with room, the same command
/// finishes it.
#[test]
fn catch_up_rounds_check_space_for_what_they_still_need() {
    if !is_root() {
        eprintln!("skipped: needs root to mount a size-limited tmpfs");
        return;
    }
    let work = tempdir("space-rounds");
    let src = work.path().join("src");
    std::fs::create_dir_all(src.join("media")).unwrap();
    for i in 0..4u64 {
        std::fs::write(src.join(format!("media/{i}.bin")), noise(i + 1, 4 << 20)).unwrap();
    }
    let Some(fs) = Tmpfs::mount(&work.path().join("mnt"), "40m") else {
        eprintln!("skipped: mounting tmpfs failed (no privilege in this container?)");
        return;
    };
    let dest = fs.0.join("history");
    let (old, new) = (Device::new("old"), Device::new("new"));
    let mut s = old.send(&src, "127.0.0.1:0", &["--follow", "--poll-interval", "0.2"]);
    let (addr, code) = listening(&s.wait_event("listening", LONG));
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    r.wait_event("verified", LONG);
    // 16 MiB here, ~24 MiB free. A 6 MiB catch-up needs 6 MiB + margin (16 MiB): it fits,
    // although the whole history (22 MiB + margin) would not.
    let put = |name: &str, data: Vec<u8>| {
        // Written aside and renamed in: the sender never scans half a file.
        let tmp = work.path().join(name);
        std::fs::write(&tmp, data).unwrap();
        std::fs::rename(&tmp, src.join("media").join(name)).unwrap();
    };
    put("new-a.bin", noise(50, 6 << 20));
    let ev = r.wait_event("verified", LONG);
    assert_eq!(u64_of(&ev, "round"), 2, "{ev}");
    // ~18 MiB free now; a 12 MiB catch-up needs more: refused before writing, exit 6.
    put("new-b.bin", noise(51, 12 << 20));
    r.expect_exit(6, LONG);
    let err = &r.seen_named("error")[0];
    assert_eq!(err["kind"], "destination", "{err}");
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("not enough space"), "{msg}");
    assert!(!dest.join("media/new-b.bin").exists());
    assert_eq!(
        std::fs::read(dest.join("media/new-a.bin")).unwrap(),
        noise(50, 6 << 20),
        "the verified round-2 tree must stay in place"
    );
    assert!(s.running(), "the sender must keep waiting for the receiver");

    fs.resize("96m");
    let mut r = new.receive(&dest, &addr, None, &[]);
    loop {
        r.wait_event("verified", LONG);
        if ferry_testkit::tree_diff(&src, &dest).unwrap().is_empty() {
            break;
        }
    }
    s.interrupt();
    s.expect_exit(0, LONG);
    r.expect_exit(0, LONG);
    assert_trees_equal(&src, &dest).unwrap();
}
