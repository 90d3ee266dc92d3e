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

/// A terminal in tmux running one shell command, driven the way a person meets it.
pub(crate) struct Tmux {
    name: String,
}

impl Tmux {
    /// Starts `command` in a detached tmux session (None, with the reason printed, without
    /// tmux).
    pub(crate) fn start(command: &str) -> Option<Tmux> {
        let ok = std::process::Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            println!("SKIP: tmux is not installed (scripts/install-test-deps.sh installs it)");
            return None;
        }
        let name = format!("ferry-test-{}-{}", std::process::id(), free_udp_port());
        let status = std::process::Command::new("tmux")
            .args(["new-session", "-d", "-s", &name, "-x", "200", "-y", "50"])
            .arg(command)
            .status()
            .expect("tmux new-session");
        assert!(status.success(), "tmux new-session failed");
        Some(Tmux { name })
    }

    /// Types `keys` and Enter.
    pub(crate) fn type_line(&self, keys: &str) {
        let status = std::process::Command::new("tmux")
            .args(["send-keys", "-t", &self.name, "-l", keys])
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
        let status = std::process::Command::new("tmux")
            .args(["send-keys", "-t", &self.name, "Enter"])
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }

    /// What the screen shows (with its scrollback).
    pub(crate) fn screen(&self) -> String {
        let out = std::process::Command::new("tmux")
            .args(["capture-pane", "-p", "-J", "-S", "-500", "-t", &self.name])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen shows `text` `times` times.
    pub(crate) fn wait_for(&self, text: &str, times: usize) -> String {
        let deadline = std::time::Instant::now() + LONG;
        loop {
            let screen = self.screen();
            if screen.matches(text).count() >= times {
                return screen;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the screen never showed {text:?} {times} time(s):\n{screen}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status();
    }
}

/// At the code prompt a mistyped or empty code is asked again (nothing was tried with it, so
/// the sender's code is not used up), the right one then migrates; the time shown is the
/// migration's, not the time spent at the prompt (on either end).
#[test]
fn the_code_prompt_asks_again_after_a_mistyped_code_and_times_only_the_migration() {
    let src = shared_history(4, 25);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("tty");
    let dest = work.path().join("history");
    let (mut s, addr, code) = start_sender(&old, src, "127.0.0.1:0");
    let command = format!(
        "FERRY_HOME={} {} receive {} --connect {addr}; echo EXIT=$?; sleep 600",
        new.home.path().display(),
        env!("CARGO_BIN_EXE_ferry"),
        dest.display()
    );
    let Some(tty) = Tmux::start(&command) else {
        return;
    };
    tty.wait_for("Pairing code shown on", 1);
    tty.type_line("12");
    let screen = tty.wait_for("Pairing code shown on", 2);
    assert!(screen.contains("try again"), "{screen}");
    tty.type_line("");
    tty.wait_for("Pairing code shown on", 3);
    // Time at the prompt is not the migration's.
    std::thread::sleep(std::time::Duration::from_secs(8));
    tty.type_line(&code);
    let screen = tty.wait_for("EXIT=", 1);
    assert!(screen.contains("EXIT=0"), "{screen}");
    // Nor is the sender's wait for a receiver (it listened through the 8 s at the prompt).
    let sent = s.wait_event("done", LONG);
    let sender_secs = sent["elapsed_s"].as_f64().unwrap_or(f64::MAX);
    assert!(sender_secs < 8.0, "the sender counted its wait: {sent}");
    s.expect_exit(0, LONG);
    let done = screen
        .lines()
        .find(|l| l.starts_with("done: "))
        .unwrap_or_else(|| panic!("no done line:\n{screen}"));
    let secs: f64 = done
        .split(" in ")
        .nth(2)
        .and_then(|t| t.split(" s").next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no time in {done:?}"));
    assert!(secs < 8.0, "the prompt's time was counted: {done}");
    ferry_testkit::assert_histories_equal(src, &dest).expect("trees equal");
}

/// The receiver's bar shows files done of the total and the rate in binary units; when the
/// sender freezes (SIGSTOP) it says "reconnecting…" within seconds, not after the idle timeout,
/// and the migration completes after SIGCONT (issue 18, items 6 and 10).
#[test]
fn the_bar_shows_files_and_says_reconnecting_as_soon_as_the_sender_is_silent() {
    let src = shared_history(48, 7);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("tty");
    let dest = work.path().join("history");
    let (mut s, addr, code) = start_sender_with(&old, src, "127.0.0.1:0", &["--limit-rate", "8MB"]);
    let command = format!(
        "FERRY_HOME={} {} receive {} --connect {addr} --code {code}; echo EXIT=$?; sleep 600",
        new.home.path().display(),
        env!("CARGO_BIN_EXE_ferry"),
        dest.display()
    );
    let Some(tty) = Tmux::start(&command) else {
        return;
    };
    let screen = tty.wait_for("MiB/s", 1);
    let files = s.seen_named("manifest")[0]["files"].as_u64().unwrap();
    assert!(
        screen.contains(&format!("/{files} files")) && screen.contains("ETA"),
        "no files done of {files} or no ETA beside the bar:\n{screen}"
    );
    signal(s.pid(), "STOP");
    let frozen = std::time::Instant::now();
    let screen = tty.wait_for("reconnecting…", 1);
    let took = frozen.elapsed();
    signal(s.pid(), "CONT");
    assert!(
        took < std::time::Duration::from_secs(10),
        "\"reconnecting…\" after {took:?}:\n{screen}"
    );
    let screen = tty.wait_for("EXIT=", 1);
    assert!(screen.contains("EXIT=0"), "{screen}");
    s.expect_exit(0, LONG);
    ferry_testkit::assert_histories_equal(src, &dest).expect("trees equal");
}
