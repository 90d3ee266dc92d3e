//! Text from the other device never drives this terminal: file names, the device name, close
//! reasons and log lines carrying them are escaped in human output (issue 14, finding 7).

use std::ffi::OsString;
use std::fs;

use crate::util::*;

/// Whether `s` holds a C0 or C1 control other than a newline, or DEL: the start of an escape
/// sequence (OSC to set the title, CSI to clear the screen) or any other terminal control.
fn raw_controls(s: &str) -> Vec<char> {
    s.chars().filter(|&c| c.is_control() && c != '\n').collect()
}

#[test]
fn escape_sequences_in_a_senders_file_names_and_device_name_are_escaped_on_the_receiver() {
    let work = tempdir("tty");
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let title = "\u{1b}]0;pwned\u{7}title.txt";
    let clear = "\u{1b}[2Jclear.txt";
    fs::write(src.join("ok.txt"), b"fine").unwrap();
    fs::write(src.join(title), b"sets the window title").unwrap();
    fs::write(src.join(clear), b"clears the screen").unwrap();
    // DEST (received into with --yes) holds a non-empty directory where the sender's file
    // "ESC[2Jclear.txt" goes: the receiver fails naming that file.
    let dest = work.path().join("history");
    fs::create_dir_all(dest.join(clear).join("mine")).unwrap();
    fs::write(dest.join(clear).join("mine/keep"), b"not ferry's").unwrap();

    let (old, new) = (Device::new("old"), Device::new("new"));
    let (s, addr, code) = start_sender_with(
        &old,
        &src,
        "127.0.0.1:0",
        // A title-setting OSC and a right-to-left override ("evil<RLO>gpj.exe" would show as
        // "evilexe.jpg"). Device names are sanitised once, on both sides of pairing (controls
        // become spaces, overrides are dropped), and whatever reaches the screen is escaped.
        &["--name", "evil\u{1b}]0;t\u{7}\u{202e}gpj.exe"],
    );
    // Human mode (no --json), with info logs.
    let args: Vec<OsString> = vec![
        "receive".into(),
        dest.clone().into(),
        "--connect".into(),
        addr.into(),
        "--code".into(),
        code.into(),
        "--yes".into(),
        "-v".into(),
    ];
    let mut r = new.spawn("receive", args);
    let exit = r.wait_code(LONG);
    let mut stdout = Vec::new();
    while let Some(ev) = r.next_event(std::time::Duration::from_secs(1)) {
        stdout.push(ev["line"].as_str().unwrap_or_default().to_string());
    }
    let err = r.stderr();
    assert_ne!(
        exit, 0,
        "the receiver should fail on the blocked path:\n{err}"
    );
    let bad = raw_controls(&err);
    assert!(bad.is_empty(), "raw controls {bad:?} on stderr:\n{err:?}");
    // The sender's file name reached the receiver's message, escaped.
    assert!(
        err.contains("\\u{1b}[2Jclear.txt"),
        "the blocked file is not named (escaped):\n{err}"
    );
    assert!(
        err.contains("paired with evil") && err.contains("gpj.exe ("),
        "the sender's name is not shown (sanitised):\n{err}"
    );
    assert!(!err.contains('\u{202e}'), "raw override on stderr:\n{err}");
    for line in &stdout {
        let bad = raw_controls(line);
        assert!(bad.is_empty(), "raw controls {bad:?} on stdout: {line:?}");
    }
    eprintln!("receiver (exit {exit}):\n{err}");
    s.interrupt();
}
