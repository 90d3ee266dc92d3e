//! Full disks, read-only destinations, unreadable source files and real I/O errors, through the
//! real binary. Root only (tmpfs and loop mounts, `setpriv`); each test skips with a printed
//! reason otherwise.
//!
//! The failure policy under test (README, "When something fails"): the side that cannot read or
//! write stops with a message naming the path and what to do, exit 6 (destination) or 8
//! (source); nothing partial ever sits at a final path; what was verified and committed is kept,
//! and the same command, run again once the cause is fixed, resumes without fetching it again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_testkit::{assert_histories_equal, generate, HistorySpec};

use crate::util::*;

/// Each fault here must land while data is still streaming: the sender is paced (64 MiB takes
/// about 2 s) so that it does on a fast, quiet machine as on a loaded one.
const PACED: &[&str] = &["--limit-rate", "32MB"];

const STATE: &str = ".ferry";

fn skip_unless_root(what: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("skipped: needs root to {what}");
    true
}

/// Bytes the file system has allocated for the files directly in `dir`.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    })
}

fn journal_len(dest: &Path) -> u64 {
    std::fs::metadata(dest.join(STATE).join("journal")).map_or(0, |m| m.len())
}

/// Waits (following `r`'s events) until the receiver reports at least `fraction` of the bytes
/// and then commits once more (its journal grows), so that something is durable.
fn wait_committed(r: &mut Ferry, dest: &Path, fraction: f64) {
    let deadline = Instant::now() + LONG;
    let mut reached: Option<u64> = None;
    loop {
        assert!(Instant::now() < deadline, "no commit after {fraction}");
        if let Some(len) = reached {
            if journal_len(dest) > len.max(64) {
                return;
            }
        }
        match r.next_event(Duration::from_millis(2)) {
            Some(ev)
                if ev["event"] == "progress"
                    && reached.is_none()
                    && u64_of(&ev, "bytes_done") as f64
                        >= fraction * u64_of(&ev, "bytes_total") as f64 =>
            {
                reached = Some(journal_len(dest));
            }
            Some(ev) if ev["event"] == "done" || ev["event"] == "error" => {
                panic!("the receiver ended before {fraction}: {ev}")
            }
            _ => {}
        }
    }
}

/// Waits (following `r`'s events) until the receiver reports at least `fraction` of the bytes.
fn wait_progress(r: &mut Ferry, fraction: f64) {
    loop {
        let ev = r.wait_event("progress", LONG);
        if u64_of(&ev, "bytes_done") as f64 >= fraction * u64_of(&ev, "bytes_total") as f64 {
            return;
        }
    }
}

/// Runs the same receive command again and checks that it resumes and completes: returns
/// (bytes it already had, wire bytes it received).
fn resume_to_done(new: &Device, dest: &Path, addr: &str, src: &Path) -> (u64, u64) {
    let mut r = new.receive(dest, addr, None, &[]);
    let done = r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    assert_histories_equal(src, dest).unwrap();
    let (code, err) = verify(dest);
    assert_eq!(code, 0, "ferry verify failed: {err}");
    // No `resumed` event when nothing was kept.
    let have = r
        .seen_named("resumed")
        .first()
        .map_or(0, |e| u64_of(e, "bytes_have"));
    (have, u64_of(&done, "wire_bytes"))
}

fn error_event(f: &Ferry) -> (String, String) {
    let errs = f.seen_named("error");
    let e = errs.first().expect("an error event");
    (
        e["kind"].as_str().unwrap_or_default().to_string(),
        e["message"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn no_space_mid_chunk_stops_with_exit_6_then_resumes() {
    if skip_unless_root("mount a size-limited tmpfs") {
        return;
    }
    let src = shared_history(64, 21);
    let work = tempdir("enospc-chunk");
    // Room for the history and the free-space check's 16 MiB margin: the check passes.
    let Some(fs) = Tmpfs::mount(&work.path().join("mnt"), "96m") else {
        eprintln!("skipped: mounting tmpfs failed");
        return;
    };
    let dest = fs.0.join("history");
    let (old, new) = (Device::new("old"), Device::new("new"));
    let (mut s, addr, code) = start_sender_with(&old, src, "127.0.0.1:0", PACED);
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    // The first progress event comes once the store is prepared for the whole manifest (the
    // free-space check passed; chunks may have flowed while the manifest streamed in). Stop
    // the receiver there and fill the disk up to 40 MiB of free space, so that ENOSPC comes in
    // the middle of the data (after two 16 MiB group commits).
    r.wait_event("progress", LONG);
    signal(r.pid(), "STOP");
    let free = free_bytes(&fs.0).unwrap();
    let ball = fs.0.join("balloon");
    balloon(&ball, free.saturating_sub(40 * MIB));
    signal(r.pid(), "CONT");

    r.expect_exit(6, LONG);
    let (kind, msg) = error_event(&r);
    assert_eq!(kind, "destination");
    assert!(msg.contains("no space left"), "{msg}");
    assert!(msg.contains("run the same command again"), "{msg}");
    eprintln!("receiver stopped: {msg}");
    let present = final_paths_whole(src, &dest);
    assert!(
        !dest.join(STATE).join("receipt").exists(),
        "a receipt without the data"
    );
    assert!(s.running(), "the sender must wait for the receiver");

    std::fs::remove_file(&ball).unwrap();
    let (have, wire) = resume_to_done(&new, &dest, &addr, src);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    let total = u64_of(r.seen_named("manifest")[0], "bytes");
    eprintln!(
        "ENOSPC mid-chunk: {present} final paths before; resumed with {have} of {total} bytes, then {wire} wire bytes"
    );
    assert!(
        have >= 16 * MIB,
        "what was committed before ENOSPC was lost: {have}"
    );
    assert!(
        wire <= total - have,
        "re-sent verified data: {wire} wire bytes for {} missing bytes",
        total - have
    );
}

/// A tree of many small files with long names: its receipt (one entry per file) is several
/// times larger than the journal (68 bytes per chunk), so that the space the receipt needs
/// is not the space the journal frees.
fn many_small_files(root: &Path) -> (u64, u64) {
    let mut pages = 0u64;
    let mut n = 0u64;
    for d in 0..8 {
        let dir = root.join(format!("chat-{d:02}-{}", "x".repeat(60)));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..200u64 {
            let len = 700 + (i * 37 + d * 11) % 2800;
            let body: Vec<u8> = (0..len)
                .map(|j| (j.wrapping_mul(31) ^ i ^ (d << 4)) as u8)
                .collect();
            let name = format!("{i:04}-{}.bin", "message-attachment-".repeat(9));
            std::fs::write(dir.join(name), body).unwrap();
            pages += len.div_ceil(4096);
            n += 1;
        }
    }
    (n, pages * 4096)
}

#[test]
fn no_space_mid_finalize_leaves_final_paths_whole_then_resumes_without_resending() {
    if skip_unless_root("mount a size-limited tmpfs") {
        return;
    }
    let work = tempdir("enospc-fin");
    let src = work.path().join("src").join("chat-history");
    let (files, data) = many_small_files(&src);
    let Some(fs) = Tmpfs::mount(&work.path().join("mnt"), "32m") else {
        eprintln!("skipped: mounting tmpfs failed");
        return;
    };
    let dest = fs.0.join("history");
    let (old, new) = (Device::new("old"), Device::new("new"));
    let (mut s, addr, code) = start_sender_with(&old, &src, "127.0.0.1:0", PACED);
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    // Finalize renames (no space), creates directories (no blocks on tmpfs) and writes the
    // receipt: that is where it needs space. Leave exactly room for the staged data and the
    // journal, plus 64 KiB: the receipt (well over 64 KiB here) cannot be written. The first
    // progress event comes once the store is prepared for the whole manifest.
    r.wait_event("progress", LONG);
    signal(r.pid(), "STOP");
    let staged = allocated(&dest.join(STATE).join("staging"));
    let journal_max = (8 + 68 * files).div_ceil(4096) * 4096;
    let need = data.saturating_sub(staged) + journal_max + 64 * 1024;
    let free = free_bytes(&fs.0).unwrap();
    let ball = fs.0.join("balloon");
    let got = balloon(&ball, free - need);
    assert_eq!(got, free - need, "the balloon did not fit");
    signal(r.pid(), "CONT");

    r.expect_exit(6, LONG);
    let (kind, msg) = error_event(&r);
    assert_eq!(kind, "destination");
    assert!(msg.contains("no space left"), "{msg}");
    assert!(
        msg.contains("receipt"),
        "ENOSPC did not come while finalize wrote the receipt: {msg}"
    );
    eprintln!("receiver stopped: {msg}");
    // Every final path is whole (here all of them: the receipt comes after the renames); the
    // destination does not claim completion.
    let present = final_paths_whole(&src, &dest);
    assert!(!dest.join(STATE).join("receipt").exists());
    let (vcode, _) = verify(&dest);
    assert_ne!(vcode, 0, "verify passed without a receipt");

    std::fs::remove_file(&ball).unwrap();
    let (have, wire) = resume_to_done(&new, &dest, &addr, &src);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    let total = u64_of(r.seen_named("manifest")[0], "bytes");
    eprintln!(
        "ENOSPC mid-finalize: {present} of {files} final paths whole; resumed with {have} of {total} bytes, {wire} wire bytes"
    );
    assert_eq!(have, total, "verified data was not kept");
    assert_eq!(wire, 0, "verified data was sent again");
}

#[test]
fn read_only_destination_is_refused_with_exit_6_and_nothing_is_lost() {
    if skip_unless_root("mount and remount a tmpfs") {
        return;
    }
    let src = shared_history(64, 21);
    let work = tempdir("rodest");
    let Some(fs) = Tmpfs::mount(&work.path().join("mnt"), "96m") else {
        eprintln!("skipped: mounting tmpfs failed");
        return;
    };
    let dest = fs.0.join("history");
    let (old, new) = (Device::new("old"), Device::new("new"));
    let (mut s, addr, code) = start_sender_with(&old, src, "127.0.0.1:0", PACED);

    // A fresh destination on a read-only file system.
    fs.remount("ro");
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    r.expect_exit(6, LONG);
    let (kind, msg) = error_event(&r);
    assert_eq!(kind, "destination");
    assert!(msg.contains("read-only"), "{msg}");
    eprintln!("fresh read-only destination: {msg}");
    assert!(s.running());

    // A half-received destination that became read-only: refused, its state untouched.
    fs.remount("rw");
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    wait_committed(&mut r, &dest, 0.3);
    r.kill9();
    let journal = std::fs::read(dest.join(STATE).join("journal")).unwrap();
    fs.remount("ro");
    let mut r = new.receive(&dest, &addr, None, &[]);
    r.expect_exit(6, LONG);
    let (kind, msg) = error_event(&r);
    assert_eq!(kind, "destination");
    assert!(msg.contains("read-only"), "{msg}");
    assert!(msg.contains("what already arrived is kept"), "{msg}");
    assert_eq!(
        std::fs::read(dest.join(STATE).join("journal")).unwrap(),
        journal
    );

    fs.remount("rw");
    let (have, _) = resume_to_done(&new, &dest, &addr, src);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    assert!(have > 0, "the committed data was lost");
}

/// `setpriv` flags that run a command as `nobody`.
const AS_NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--",
];

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown_nobody(path: &Path) {
    let st = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A sender run as `nobody` (so that file permissions apply; root reads everything).
fn send_as_nobody(home: &Path, src: &Path, listen: &str) -> Ferry {
    Ferry::spawn_with(
        "send",
        home,
        AS_NOBODY,
        [
            "send".as_ref(),
            src.as_os_str(),
            "--listen".as_ref(),
            listen.as_ref(),
            "--no-mdns".as_ref(),
            "--json".as_ref(),
        ],
    )
}

#[test]
fn unreadable_source_file_stops_the_migration_naming_it() {
    if skip_unless_root("run the sender as another user") {
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipped: setpriv is not installed");
        return;
    }
    // The binary must be reachable by `nobody`.
    let exe = Path::new(env!("CARGO_BIN_EXE_ferry"));
    if !exe.ancestors().skip(1).all(|d| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    }) {
        eprintln!("skipped: {} is not reachable by other users", exe.display());
        return;
    }
    let work = tempdir("unreadable");
    chmod(work.path(), 0o755);
    let src = work.path().join("chat-history");
    generate(
        &src,
        &HistorySpec {
            seed: 5,
            ..HistorySpec::with_size(24 * MIB)
        },
    )
    .unwrap();
    let home = work.path().join("home-old");
    std::fs::create_dir_all(&home).unwrap();
    chown_nobody(&home);
    chmod(&home, 0o700);
    // The largest file: certainly not all read ahead before the session starts.
    let victim: PathBuf = files_under(&src)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(src.join(p)).map_or(0, |m| m.len()))
        .unwrap();
    let victim_abs = src.join(&victim);
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();

    // 1. Unreadable when the sender starts: it stops before pairing, naming every such file.
    let second: PathBuf = files_under(&src)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "jpg"))
        .unwrap();
    chmod(&victim_abs, 0o000);
    chmod(&src.join(&second), 0o000);
    let mut s = send_as_nobody(&home, &src, "127.0.0.1:0");
    s.expect_exit(8, LONG);
    let (kind, msg) = error_event(&s);
    assert_eq!(kind, "source");
    assert!(
        msg.contains(&name),
        "the message does not name {name}: {msg}"
    );
    let second_name = second.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        msg.contains(&second_name),
        "the message does not name {second_name}: {msg}"
    );
    assert!(msg.contains("2 files"), "{msg}");
    assert!(msg.contains("ermission denied"), "{msg}");
    assert!(s.seen_named("listening").is_empty(), "it paired anyway");
    eprintln!("at scan: {msg}");
    chmod(&src.join(&second), 0o644);

    // 2. Unreadable once the sender is serving (it opens files as it reads them): both sides
    //    stop with exit 8 naming it; the receiver keeps what it committed.
    chmod(&victim_abs, 0o644);
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut s = send_as_nobody(&home, &src, &listen);
    let ev = s.wait_event("listening", LONG);
    let (addr, code) = listening(&ev);
    chmod(&victim_abs, 0o000);
    let new = Device::new("new");
    let dest = work.path().join("dest");
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    s.expect_exit(8, LONG);
    let (kind, msg) = error_event(&s);
    assert_eq!(kind, "source");
    assert!(msg.contains(&name), "sender: {msg}");
    r.expect_exit(8, LONG);
    let (kind, rmsg) = error_event(&r);
    assert_eq!(kind, "source");
    assert!(rmsg.contains(&name), "receiver: {rmsg}");
    eprintln!("while serving: sender: {msg}\n  receiver: {rmsg}");
    final_paths_whole(&src, &dest);

    // 3. Fixed: the same commands finish the migration.
    chmod(&victim_abs, 0o644);
    let mut s = send_as_nobody(&home, &src, &listen);
    s.wait_event("listening", LONG);
    resume_to_done(&new, &dest, &addr, &src);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
}

/// An ext4 file system in a file, loop-mounted; `shutdown` makes every later read and write on
/// it fail with EIO (EXT4_IOC_SHUTDOWN, what xfstests' `godown` does: the disk "went away"
/// without flushing its log), `remount` brings it back as after a power cut.
struct Ext4Loop {
    img: PathBuf,
    mnt: PathBuf,
}

impl Ext4Loop {
    fn new(dir: &Path, size: &str) -> Option<Ext4Loop> {
        let img = dir.join("disk.img");
        let mnt = dir.join("disk");
        std::fs::create_dir_all(&mnt).ok()?;
        let ok = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
        if !ok(Command::new("truncate").args(["-s", size]).arg(&img))
            || !ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))
        {
            return None;
        }
        let l = Ext4Loop { img, mnt };
        l.mount().then_some(l)
    }

    fn mount(&self) -> bool {
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&self.img)
            .arg(&self.mnt)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn shutdown(&self) {
        // EXT4_IOC_SHUTDOWN = _IOR('X', 125, __u32); 2 = EXT4_GOING_FLAGS_NOLOGFLUSH. The
        // workspace denies unsafe code, so the ioctl goes through python3.
        let py = format!(
            "import fcntl,os,struct; fd=os.open({:?}, os.O_RDONLY); fcntl.ioctl(fd, 0x8004587D, struct.pack('I', 2))",
            self.mnt.to_string_lossy()
        );
        let st = Command::new("python3").args(["-c", &py]).status().unwrap();
        assert!(st.success(), "ext4 shutdown failed");
    }

    /// Whether a loop device still holds the image.
    fn attached(&self) -> bool {
        Command::new("losetup")
            .arg("-j")
            .arg(&self.img)
            .output()
            .is_ok_and(|o| !o.stdout.is_empty())
    }

    /// Unmounts and mounts again. The old loop device is released asynchronously, and a mount
    /// made before that would get the shut-down file system back: wait for the release, and
    /// retry until every file reads.
    fn remount(&self) {
        for attempt in 0..10 {
            let st = Command::new("umount").arg(&self.mnt).status().unwrap();
            assert!(st.success(), "umount failed");
            let until = Instant::now() + Duration::from_secs(20);
            while self.attached() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(200 * attempt));
            assert!(self.mount(), "mount again failed");
            let bad = files_under(&self.mnt).into_iter().find_map(|p| {
                let p = self.mnt.join(p);
                match std::fs::read(&p) {
                    Err(e) if !p.is_symlink() => Some(format!("{}: {e}", p.display())),
                    _ => None,
                }
            });
            let Some(bad) = bad else { return };
            eprintln!("the remounted file system still fails reads ({bad}); again");
        }
        panic!("the file system did not come back readable");
    }
}

impl Drop for Ext4Loop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

fn ext4_loop(dir: &Path, size: &str) -> Option<Ext4Loop> {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("skipped: python3 is needed for the shutdown ioctl");
        return None;
    }
    let l = Ext4Loop::new(dir, size);
    if l.is_none() {
        eprintln!("skipped: cannot make and loop-mount an ext4 image here");
    }
    l
}

#[test]
fn io_error_on_destination_write_stops_with_exit_6_then_resumes_after_the_disk_returns() {
    if skip_unless_root("loop-mount an ext4 image") {
        return;
    }
    let src = shared_history(64, 21);
    let work = tempdir("eio-dest");
    let Some(disk) = ext4_loop(work.path(), "192M") else {
        return;
    };
    let dest = disk.mnt.join("history");
    let (old, new) = (Device::new("old"), Device::new("new"));
    let (mut s, addr, code) = start_sender_with(&old, src, "127.0.0.1:0", PACED);
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    wait_committed(&mut r, &dest, 0.3);
    // Held while the disk goes away, so that the error lands mid-stream and not after the
    // (fast) rest of the transfer.
    signal(r.pid(), "STOP");
    disk.shutdown();
    signal(r.pid(), "CONT");
    r.expect_exit(6, LONG);
    let (kind, msg) = error_event(&r);
    assert_eq!(kind, "destination");
    assert!(msg.contains("Input/output error"), "{msg}");
    assert!(msg.contains("run the same command again"), "{msg}");
    eprintln!("receiver stopped: {msg}");
    assert!(s.running());

    // Back as after a power cut: what was fsynced and journaled is there, the rest is not.
    disk.remount();
    final_paths_whole(src, &dest);
    let (have, wire) = resume_to_done(&new, &dest, &addr, src);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    let total = u64_of(r.seen_named("manifest")[0], "bytes");
    eprintln!("EIO on the destination: resumed with {have} of {total} bytes, {wire} wire bytes");
    assert!(have > 0, "committed data did not survive");
    assert!(have < total, "the error did not land mid-stream");
    assert!(wire <= total - have);
}

#[test]
fn io_error_on_source_read_stops_with_exit_8_then_resumes() {
    if skip_unless_root("loop-mount an ext4 image") {
        return;
    }
    let hist = shared_history(64, 21);
    let work = tempdir("eio-src");
    let Some(disk) = ext4_loop(work.path(), "192M") else {
        return;
    };
    let src = disk.mnt.join("chat-history");
    let st = Command::new("cp")
        .arg("-a")
        .arg(hist)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(Command::new("sync").status().unwrap().success());
    // Drop the copy from the page cache is not needed: a shut-down ext4 fails reads up front.
    let (old, new) = (Device::new("old"), Device::new("new"));
    let dest = work.path().join("dest");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let (mut s, addr, code) = start_sender_with(&old, &src, &listen, PACED);
    let mut r = new.receive(&dest, &addr, Some(&code), &["--give-up-after", "60"]);
    // Hold the sender early (it reads ahead of what the receiver reports by the link's window
    // and its read-ahead, 32 MiB in all), let the receiver commit what it has (its 500 ms
    // timer), then take the disk away.
    wait_progress(&mut r, 0.05);
    signal(s.pid(), "STOP");
    std::thread::sleep(Duration::from_millis(800));
    disk.shutdown();
    signal(s.pid(), "CONT");
    s.expect_exit(8, LONG);
    let (kind, msg) = error_event(&s);
    assert_eq!(kind, "source");
    assert!(msg.contains("Input/output error"), "{msg}");
    r.expect_exit(8, LONG);
    let (kind, rmsg) = error_event(&r);
    assert_eq!(kind, "source");
    eprintln!("sender stopped: {msg}\n  receiver: {rmsg}");
    final_paths_whole(hist, &dest);

    disk.remount();
    let mut s = old.send(&src, &listen, &[]);
    s.wait_event("listening", LONG);
    let (have, wire) = resume_to_done(&new, &dest, &addr, hist);
    s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    let total = u64_of(r.seen_named("manifest")[0], "bytes");
    eprintln!("EIO on the source: resumed with {have} of {total} bytes, {wire} wire bytes");
    assert!(have > 0 && have < total, "{have} of {total}");
    assert!(wire <= total - have);
}
