//! Helpers for the integration tests: temp dirs, running the real `ferry` binary with its own
//! `FERRY_HOME` and `--json`, reading its events with timeouts, and killing it (SIGKILL).
//!
//! Every child is killed when its handle is dropped, so a failing test leaves no stray process.
//! Every wait has a timeout and fails with the events and stderr seen so far.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_testkit::{generate, HistorySpec};
use serde_json::Value;

pub const MIB: u64 = 1024 * 1024;

/// Generous bound for anything that should take seconds: two shared cores, debug build,
/// several tests at once.
pub const LONG: Duration = Duration::from_secs(120);

pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("ferry-e2e-{prefix}-"))
        .tempdir()
        .expect("create a temp dir")
}

/// A port on 127.0.0.1 that was free a moment ago (UDP, as QUIC uses).
pub fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
    s.local_addr().expect("local addr").port()
}

/// One generated history per (size, seed), shared read-only by the tests (ferry never writes
/// into the source folder, except that SQLite may create a database's `-shm` index when ferry
/// snapshots it, which the history comparisons ignore; hash caches and snapshots live under
/// each `FERRY_HOME`). Kept under cargo's
/// `CARGO_TARGET_TMPDIR` and reused by later runs of the same build, so nothing is left in the
/// system temp dir and generation is paid once.
pub fn shared_history(size_mib: u64, seed: u64) -> &'static Path {
    type Generated = Vec<(u64, u64, &'static Path)>;
    static CACHE: OnceLock<Mutex<Generated>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(Vec::new()));
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, _, p)) = c.iter().find(|(s, sd, _)| *s == size_mib && *sd == seed) {
        return p;
    }
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ferry-histories");
    let done = parent.join(format!("{size_mib}mib-seed{seed}"));
    if !done.join("chat-history").is_dir() {
        std::fs::create_dir_all(&parent).expect("create the history cache folder");
        // Generated aside, then renamed into place: a half-written tree is never reused.
        let tmp = tempfile::Builder::new()
            .prefix(".partial-")
            .tempdir_in(&parent)
            .expect("temp dir");
        let spec = HistorySpec {
            seed,
            ..HistorySpec::with_size(size_mib * MIB)
        };
        let t = Instant::now();
        let rep = generate(&tmp.path().join("chat-history"), &spec).expect("generate a history");
        eprintln!(
            "generated a {size_mib} MiB history (seed {seed}): {} files, {} bytes in {:.1} s",
            rep.files,
            rep.bytes,
            t.elapsed().as_secs_f64()
        );
        let tmp = tmp.keep();
        if std::fs::rename(&tmp, &done).is_err() {
            // Another test process finished the same history first.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    let src: &'static Path = Box::leak(done.join("chat-history").into_boxed_path());
    c.push((size_mib, seed, src));
    src
}

/// One device: a `FERRY_HOME` of its own.
pub struct Device {
    pub home: tempfile::TempDir,
}

impl Device {
    pub fn new(name: &str) -> Self {
        Device {
            home: tempdir(&format!("home-{name}")),
        }
    }

    /// Starts `ferry <args>` for this device.
    pub fn spawn<I, S>(&self, label: &str, args: I) -> Ferry
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Ferry::spawn(label, self.home.path(), args)
    }

    /// `ferry send DIR --listen ADDR --no-mdns --json`.
    pub fn send(&self, dir: &Path, listen: &str, extra: &[&str]) -> Ferry {
        let mut args: Vec<OsString> = vec![
            "send".into(),
            dir.into(),
            "--listen".into(),
            listen.into(),
            "--no-mdns".into(),
            "--json".into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        self.spawn("send", args)
    }

    /// `ferry receive DEST --connect ADDR [--code CODE] --json [extra…]`.
    pub fn receive(&self, dest: &Path, connect: &str, code: Option<&str>, extra: &[&str]) -> Ferry {
        let mut args: Vec<OsString> = vec![
            "receive".into(),
            dest.into(),
            "--connect".into(),
            connect.into(),
            "--json".into(),
        ];
        if let Some(c) = code {
            args.push("--code".into());
            args.push(c.into());
        }
        args.extend(extra.iter().map(OsString::from));
        self.spawn("receive", args)
    }

    /// Runs `ferry <args>` to completion (with a timeout); returns the exit code and the child.
    pub fn run<I, S>(&self, label: &str, args: I, timeout: Duration) -> (i32, Ferry)
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut f = self.spawn(label, args);
        let code = f.wait_code(timeout);
        (code, f)
    }
}

/// A running `ferry` process. Killed (SIGKILL) and reaped on drop.
pub struct Ferry {
    label: String,
    child: Child,
    events: Receiver<Value>,
    /// Every event read so far, in order (including the ones `wait_event` skipped).
    pub seen: Vec<Value>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The thread draining stderr; joined once the process has exited, so that `stderr()` never
    /// misses the last lines.
    stderr_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    status: Option<ExitStatus>,
    stdout_closed: bool,
}

impl Ferry {
    pub fn spawn<I, S>(label: &str, home: &Path, args: I) -> Ferry
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Ferry::spawn_with(label, home, &[], args)
    }

    /// Like [`Ferry::spawn`], with the binary started through `wrapper` (e.g. `setpriv` and its
    /// flags, to run it as another user).
    pub fn spawn_with<I, S>(label: &str, home: &Path, wrapper: &[&str], args: I) -> Ferry
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Ferry::spawn_opts(label, home, wrapper, &[], false, args)
    }

    /// [`Ferry::spawn_with`] with extra environment variables, and standard input a pipe (write
    /// to it with [`Ferry::write_stdin`]) when `stdin` is true, else empty.
    pub fn spawn_opts<I, S>(
        label: &str,
        home: &Path,
        wrapper: &[&str],
        env: &[(&str, &str)],
        stdin: bool,
        args: I,
    ) -> Ferry
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(env!("CARGO_BIN_EXE_ferry"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_ferry")),
        };
        let mut child = cmd
            .args(&args)
            .env("FERRY_HOME", home)
            .env_remove("FERRY_LOG")
            .env_remove("FERRY_CODE")
            .env_remove("FERRY_TICKET")
            .envs(env.iter().copied())
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the ferry binary");
        let (tx, events) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str::<Value>(&line)
                    .unwrap_or_else(|_| serde_json::json!({"event": "raw", "line": line}));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&stderr);
        // Raw bytes: a read may end inside a multi-byte character (paths in Chinese, emoji).
        let stderr_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        });
        let label = format!(
            "{label} (ferry {})",
            args.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        Ferry {
            label,
            child,
            events,
            seen: Vec::new(),
            stderr,
            stderr_thread: Mutex::new(Some(stderr_thread)),
            status: None,
            stdout_closed: false,
        }
    }

    /// Writes `data` to the process's standard input and closes it (spawned with `stdin`).
    pub fn write_stdin(&mut self, data: &[u8]) {
        let mut pipe = self.child.stdin.take().expect("stdin is a pipe");
        pipe.write_all(data).expect("write to stdin");
    }

    /// What the process wrote to stderr so far; all of it once the process has exited.
    pub fn stderr(&self) -> String {
        if self.status.is_some() {
            let handle = self
                .stderr_thread
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(h) = handle {
                let _ = h.join();
            }
        }
        let bytes = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn context(&mut self) -> String {
        let status = self.status.or_else(|| self.child.try_wait().ok().flatten());
        let events: Vec<String> = self
            .seen
            .iter()
            .rev()
            .take(15)
            .rev()
            .map(|v| v.to_string())
            .collect();
        format!(
            "{}\n  status: {status:?}\n  last events:\n    {}\n  stderr:\n{}",
            self.label,
            events.join("\n    "),
            self.stderr()
        )
    }

    /// The next event (any kind), or `None` at the timeout or when stdout closed.
    pub fn next_event(&mut self, timeout: Duration) -> Option<Value> {
        if self.stdout_closed {
            return None;
        }
        match self.events.recv_timeout(timeout) {
            Ok(v) => {
                self.seen.push(v.clone());
                Some(v)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                self.stdout_closed = true;
                None
            }
        }
    }

    /// Waits for the first event named `name` (skipping others); panics with context on timeout,
    /// on an `error` event, or when the process ends first.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Value {
        self.wait_any(&[name], timeout)
    }

    /// Like [`Ferry::wait_event`], for the first event with any of `names`.
    pub fn wait_any(&mut self, names: &[&str], timeout: Duration) -> Value {
        let name = names.join("|");
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                Some(v) if names.iter().any(|n| v["event"] == *n) => return v,
                Some(v) if v["event"] == "error" && !names.contains(&"error") => {
                    // A sender reports wrong codes as error events and keeps running.
                    if v["kind"] != "pairing" {
                        let ctx = self.context();
                        panic!("error event while waiting for {name:?}: {v}\n{ctx}");
                    }
                }
                Some(_) => {}
                None => {
                    let why = if self.stdout_closed {
                        "the process closed stdout"
                    } else {
                        "timed out"
                    };
                    let ctx = self.context();
                    panic!("waiting for event {name:?} ({timeout:?}): {why}\n{ctx}");
                }
            }
        }
    }

    /// Events named `name` seen so far.
    pub fn seen_named(&self, name: &str) -> Vec<&Value> {
        self.seen.iter().filter(|v| v["event"] == name).collect()
    }

    /// Waits for the process to exit; panics with context at the timeout. Reads the
    /// remaining events into `seen`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.status {
                break s;
            }
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    self.status = Some(s);
                    break s;
                }
                Ok(None) => {}
                Err(e) => panic!("wait for {}: {e}", self.label),
            }
            // Drain events while waiting so nothing blocks on a full pipe.
            while self.next_event(Duration::ZERO).is_some() {}
            if Instant::now() >= deadline {
                let ctx = self.context();
                panic!("process did not exit within {timeout:?}\n{ctx}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The stdout reader ends right after the process; collect what is left.
        let until = Instant::now() + Duration::from_secs(5);
        while !self.stdout_closed && Instant::now() < until {
            self.next_event(Duration::from_millis(200));
        }
        status
    }

    /// The exit code (panics if killed by a signal).
    pub fn wait_code(&mut self, timeout: Duration) -> i32 {
        let st = self.wait_exit(timeout);
        match st.code() {
            Some(c) => c,
            None => {
                let ctx = self.context();
                panic!("killed by a signal: {st:?}\n{ctx}")
            }
        }
    }

    /// Asserts the exit code, with context on mismatch.
    pub fn expect_exit(&mut self, code: i32, timeout: Duration) {
        let got = self.wait_code(timeout);
        if got != code {
            let ctx = self.context();
            panic!("expected exit code {code}, got {got}\n{ctx}");
        }
    }

    /// SIGINT (what Ctrl-C sends).
    pub fn interrupt(&self) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot send SIGINT to {}", self.label);
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    pub fn kill9(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// The process id (for signals other than SIGKILL).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.status.is_none() && matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let ctx = self.context();
            eprintln!("--- at failure: {ctx}");
        }
    }
}

/// The `listening` event's first address on 127.0.0.1 and its code.
pub fn listening(ev: &Value) -> (String, String) {
    let addrs = ev["addrs"].as_array().expect("addrs");
    let addr = addrs
        .iter()
        .filter_map(|a| a.as_str())
        .find(|a| a.starts_with("127.0.0.1:"))
        .or_else(|| addrs.first().and_then(|a| a.as_str()))
        .expect("a listening address")
        .to_string();
    let code = ev["code"].as_str().expect("code").to_string();
    (addr, code)
}

pub fn u64_of(ev: &Value, field: &str) -> u64 {
    ev[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing or not a number in {ev}"))
}

/// Streaming BLAKE3 of a file (large files are never loaded into memory).
pub fn hash_file(path: &Path) -> String {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    h.update_reader(f)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    h.finalize().to_hex().to_string()
}

/// Free bytes on the file system holding `path` (via `df`), if known.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// Every regular file under `dir` (relative paths), `.ferry` at the root excluded.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(dir.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            if rel.as_os_str().is_empty() && e.file_name() == ".ferry" {
                continue;
            }
            let p = rel.join(e.file_name());
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(_) => out.push(p),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// Starts `ferry send` and waits for its `listening` event: (process, 127.0.0.1 address, code).
pub fn start_sender(old: &Device, src: &Path, listen: &str) -> (Ferry, String, String) {
    start_sender_with(old, src, listen, &[])
}

/// [`start_sender`] with extra flags (e.g. `--limit-rate`, so that a test can act mid-transfer
/// however fast the machine is).
pub fn start_sender_with(
    old: &Device,
    src: &Path,
    listen: &str,
    extra: &[&str],
) -> (Ferry, String, String) {
    let mut s = old.send(src, listen, extra);
    let ev = s.wait_event("listening", LONG);
    let (addr, code) = listening(&ev);
    (s, addr, code)
}

/// A finished clean migration.
pub struct Migration {
    pub _work: tempfile::TempDir,
    pub dest: PathBuf,
    pub send_done: Value,
    pub recv_done: Value,
}

/// Migrates `src` into a fresh destination between two fresh devices; asserts both sides exit
/// 0 with a `done` event naming the same root.
pub fn migrate(src: &Path) -> Migration {
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("dest");
    let dest = work.path().join("history");
    let (_, send_done, recv_done) = migrate_between(&old, &new, src, &dest);
    Migration {
        _work: work,
        dest,
        send_done,
        recv_done,
    }
}

/// Migrates `src` from `old` into `dest` on `new` (pairing with the code); asserts both sides
/// exit 0 with a `done` event naming the same root. Returns the sender's address (for a receive
/// run again against it) and both `done` events.
pub fn migrate_between(
    old: &Device,
    new: &Device,
    src: &Path,
    dest: &Path,
) -> (String, Value, Value) {
    let (mut s, addr, code) = start_sender(old, src, "127.0.0.1:0");
    let mut r = new.receive(dest, &addr, Some(&code), &[]);
    let recv_done = r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    let send_done = s.wait_event("done", LONG);
    s.expect_exit(0, LONG);
    assert_eq!(
        send_done["root"], recv_done["root"],
        "sender and receiver disagree on the root"
    );
    assert!(
        recv_done["root"].as_str().is_some_and(|h| h.len() == 64),
        "root is not a hex hash: {recv_done}"
    );
    (addr, send_done, recv_done)
}

/// `ferry verify DIR` exit code (run with a throwaway `FERRY_HOME`) and its stderr.
pub fn verify(dir: &Path) -> (i32, String) {
    let d = Device::new("verify");
    let args: Vec<OsString> = vec!["verify".into(), dir.into()];
    let (code, f) = d.run("verify", args, LONG);
    (code, f.stderr())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n")
}

/// Sends `sig` (a name such as "STOP" or "CONT") to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -s {sig} {pid} failed");
}

/// A size-limited tmpfs mounted for one test; unmounted (lazily) on drop. Root only.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "ferry-test",
                &at.to_string_lossy(),
            ])
            .status()
            .ok()?
            .success();
        ok.then(|| Tmpfs(at.to_path_buf()))
    }

    /// `mount -o remount,<opts>`, e.g. `size=64m` or `ro`.
    pub fn remount(&self, opts: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opts}"), &self.0.to_string_lossy()])
            .status()
            .unwrap();
        assert!(st.success(), "remount {opts} failed");
    }

    pub fn resize(&self, size: &str) {
        self.remount(&format!("size={size}"));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros to `path` until it holds `bytes` or the file system is full; returns the size
/// reached.
pub fn balloon(path: &Path, bytes: u64) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create the balloon");
    let block = vec![0u8; MIB as usize];
    let mut done = 0u64;
    while done < bytes {
        let n = (bytes - done).min(MIB) as usize;
        match f.write(&block[..n]) {
            Ok(0) | Err(_) => break,
            Ok(w) => done += w as u64,
        }
    }
    let _ = f.sync_all();
    done
}

/// Every final path under `dest` (outside `.ferry`) is either absent or equal to the same path
/// under `src` (databases by content, see `history_diff`): nothing partial or corrupt. Returns
/// how many files are present.
pub fn final_paths_whole(src: &Path, dest: &Path) -> usize {
    use ferry_testkit::Difference;
    let diffs = ferry_testkit::history_diff(src, dest).expect("compare the trees");
    let bad: Vec<String> = diffs
        .iter()
        .filter(|d| !matches!(d, Difference::OnlyInLeft(_)))
        .map(|d| d.to_string())
        .collect();
    assert!(
        bad.is_empty(),
        "partial or corrupt files at final paths: {bad:?}"
    );
    files_under(dest).len()
}
