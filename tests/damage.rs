//! `ferry verify` detects a flipped byte and a deleted file, naming the path.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};

use crate::util::*;

#[test]
fn verify_detects_flipped_byte_and_deleted_file() {
    let src = shared_history(8, 3);
    let m = migrate(src);
    assert_eq!(verify(&m.dest).0, 0);

    // The largest file gets one byte flipped in its middle (size unchanged).
    let mut files: Vec<_> = files_under(&m.dest)
        .into_iter()
        .map(|p| (fs::metadata(m.dest.join(&p)).unwrap().len(), p))
        .collect();
    files.sort();
    let (len, victim) = files.last().cloned().unwrap();
    // What was received (a database arrives as its snapshot, not the source's bytes).
    let original = fs::read(m.dest.join(&victim)).unwrap();
    {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.dest.join(&victim))
            .unwrap();
        f.seek(SeekFrom::Start(len / 2)).unwrap();
        let mut b = [0u8; 1];
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(len / 2)).unwrap();
        f.write_all(&[b[0] ^ 0x01]).unwrap();
        f.sync_all().unwrap();
    }
    let (code, err) = verify(&m.dest);
    assert_eq!(code, 7, "a flipped byte went unnoticed: {err}");
    let victim_s = victim.to_str().unwrap();
    assert!(
        err.contains(victim_s),
        "verify did not name {victim_s}: {err}"
    );
    let d = Device::new("v");
    let args: Vec<std::ffi::OsString> = vec![
        "verify".into(),
        m.dest.clone().into_os_string(),
        "--json".into(),
    ];
    let (code, f) = d.run("verify", args, LONG);
    assert_eq!(code, 7);
    let report = f.seen_named("verify")[0].clone();
    let mismatched: Vec<&str> = report["mismatched"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(
        mismatched,
        vec![victim_s],
        "verify named the wrong paths: {report}"
    );

    // Put it back; then delete another (non-empty) file.
    fs::write(m.dest.join(&victim), &original).unwrap();
    assert_eq!(
        verify(&m.dest).0,
        0,
        "restoring the byte did not restore the verdict"
    );
    let (_, gone) = files
        .iter()
        .rev()
        .find(|(l, p)| *l > 0 && *p != victim)
        .cloned()
        .unwrap();
    fs::remove_file(m.dest.join(&gone)).unwrap();
    let (code, f) = d.run(
        "verify",
        vec![
            std::ffi::OsString::from("verify"),
            m.dest.clone().into_os_string(),
            "--json".into(),
        ],
        LONG,
    );
    assert_eq!(code, 7, "a deleted file went unnoticed: {}", f.stderr());
    let report = f.seen_named("verify")[0].clone();
    let gone_s = gone.to_str().unwrap();
    assert!(
        report["mismatched"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == gone_s),
        "verify did not name {gone_s}: {report}"
    );
    let (_, err) = verify(&m.dest);
    assert!(
        err.contains("do not match"),
        "stderr does not explain: {err}"
    );
}
