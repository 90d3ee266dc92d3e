//! A non-empty destination that is not ferry's is refused (exit 6, untouched); with `--yes`
//! ferry receives into it and never deletes the files it did not bring.

use std::fs;

use ferry_testkit::history_diff;

use crate::util::*;

#[test]
fn foreign_non_empty_destination_is_refused_then_accepted_with_yes() {
    let src = shared_history(8, 3);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    fs::create_dir_all(dest.join("my photos")).unwrap();
    fs::write(dest.join("notes.txt"), b"mine, not ferry's\n").unwrap();
    fs::write(dest.join("my photos").join("cat.jpg"), vec![0xAB; 4096]).unwrap();
    let before = files_under(&dest);

    let (mut s, addr, code) = start_sender(&old, src, "127.0.0.1:0");
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    r.expect_exit(6, LONG);
    assert_eq!(r.seen_named("error")[0]["kind"], "destination");
    assert_eq!(
        files_under(&dest),
        before,
        "a refused destination was changed"
    );
    assert!(
        !dest.join(".ferry").exists(),
        "a refused destination got a .ferry folder"
    );
    assert_eq!(
        fs::read(dest.join("notes.txt")).unwrap(),
        b"mine, not ferry's\n"
    );
    // Refused before connecting: the code is still good.
    assert!(s.running());

    let mut r = new.receive(&dest, &addr, Some(&code), &["--yes"]);
    r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    s.expect_exit(0, LONG);
    // Exactly the history plus the unrelated files, which are unchanged.
    let diffs = history_diff(src, &dest).unwrap();
    let extra: Vec<String> = diffs.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        extra,
        vec![
            "only in right: my photos".to_string(),
            "only in right: my photos/cat.jpg".to_string(),
            "only in right: notes.txt".to_string(),
        ],
        "the destination is not the history plus the unrelated files"
    );
    assert_eq!(
        fs::read(dest.join("notes.txt")).unwrap(),
        b"mine, not ferry's\n"
    );
    assert_eq!(
        fs::read(dest.join("my photos").join("cat.jpg")).unwrap(),
        vec![0xAB; 4096]
    );
    let (code, err) = verify(&dest);
    assert_eq!(code, 0, "ferry verify failed: {err}");
}
