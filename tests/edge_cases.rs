//! Names and shapes a chat app produces: Chinese and emoji names, spaces, empty files and
//! directories, a 60-level deep tree, and a sparse file over 4 GiB.

use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Instant;

use ferry_testkit::tree_diff;

use crate::util::*;

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

#[test]
fn unicode_names_empty_entries_and_deep_tree_migrate_byte_identical() {
    let work = tempdir("odd");
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let text = "你好，世界 👋 hello world\n".repeat(2000);
    write(&src, "聊天记录/2024 年/消息 备份.txt", text.as_bytes());
    write(
        &src,
        "表情 😀🎉/照片 📷 1.jpg",
        &[0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3],
    );
    write(&src, "with spaces/ a  b  c .txt", b"spaces everywhere");
    write(&src, "Documents/🧾 receipt (copy).pdf", &vec![7u8; 70_000]);
    write(&src, "empty.txt", b"");
    write(&src, "聊天记录/空文件", b"");
    fs::create_dir_all(src.join("empty dir")).unwrap();
    fs::create_dir_all(src.join("nested/empty/空目录 🗂")).unwrap();
    let mut deep = String::new();
    for i in 0..60 {
        deep.push_str(&format!("level {i:02}/"));
    }
    write(&src, &format!("{deep}bottom 底.txt"), b"sixty levels down");
    fs::create_dir_all(src.join(&deep).join("and empty")).unwrap();

    let m = migrate(&src);
    let diffs = tree_diff(&src, &m.dest).unwrap();
    assert!(diffs.is_empty(), "trees differ: {diffs:?}");
    assert!(m.dest.join("empty dir").is_dir());
    assert!(m.dest.join("nested/empty/空目录 🗂").is_dir());
    assert_eq!(fs::metadata(m.dest.join("empty.txt")).unwrap().len(), 0);
    let (code, err) = verify(&m.dest);
    assert_eq!(code, 0, "ferry verify failed: {err}");
}

/// Slightly over 4 GiB, so offsets and sizes do not fit in 32 bits.
const BIG: u64 = (4 << 30) + 12_345;

#[test]
fn sparse_file_over_4_gib_migrates() {
    let work = tempdir("big");
    let free = free_bytes(work.path()).unwrap_or(0);
    if free < 12 << 30 {
        eprintln!(
            "SKIPPED sparse_file_over_4_gib_migrates: only {} MiB free in {} (needs 12 GiB)",
            free / MIB,
            work.path().display()
        );
        return;
    }
    let src = work.path().join("src");
    fs::create_dir_all(src.join("media")).unwrap();
    let big = src.join("media/video 大.mp4");
    {
        let mut f = File::create(&big).unwrap();
        f.set_len(BIG).unwrap();
        // Non-zero bytes at the start, across the 4 GiB boundary and at the very end.
        for (at, tag) in [
            (0u64, &b"ftypmp42 start"[..]),
            ((4 << 30) - 5, b"across-4GiB"),
            (BIG - 3, b"end"),
        ] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(tag).unwrap();
        }
        f.sync_all().unwrap();
    }
    write(&src, "db/msg_0.db", b"a small file next to the big one");
    let t = Instant::now();
    let m = migrate(&src);
    let secs = t.elapsed().as_secs_f64();
    let got = m.dest.join("media/video 大.mp4");
    assert_eq!(fs::metadata(&got).unwrap().len(), BIG);
    // Compared by streaming hashes (the testkit's byte comparison is slow in a debug build).
    let t = Instant::now();
    assert_eq!(
        files_under(&src),
        files_under(&m.dest),
        "different file sets"
    );
    for f in files_under(&src) {
        assert_eq!(
            hash_file(&src.join(&f)),
            hash_file(&m.dest.join(&f)),
            "{} differs",
            f.display()
        );
    }
    let hash_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (code, err) = verify(&m.dest);
    assert_eq!(code, 0, "ferry verify failed: {err}");
    eprintln!(
        "4 GiB sparse file: migrated in {secs:.1} s with {} bytes on the wire; compared in {hash_s:.1} s; \
         ferry verify {:.1} s",
        u64_of(&m.recv_done, "wire_bytes"),
        t.elapsed().as_secs_f64()
    );
}

/// Runs `ferry <args>` for `dev` with at most 256 open files (soft and hard: ferry cannot raise
/// it), macOS's default soft limit.
fn spawn_with_256_files(dev: &Device, label: &str, args: &[&std::ffi::OsStr]) -> Ferry {
    Ferry::spawn_with(
        label,
        dev.home.path(),
        &["prlimit", "--nofile=256:256", "--"],
        args.iter().copied(),
    )
}

/// 20 000 files of 0–4 KiB (a sticker cache, thumbnails) under `ulimit -n 256` on both ends.
/// The receiver used to keep every staging file written since the last commit open, and commits
/// came by bytes and time only: "Too many open files" (exit 6) long before the end.
#[test]
fn twenty_thousand_tiny_files_migrate_with_256_open_files() {
    let work = tempdir("tiny");
    let src = work.path().join("src");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..20_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 4097) as usize;
        let byte = (x >> 32) as u8;
        let mut data = vec![byte; len];
        data.extend_from_slice(&i.to_le_bytes());
        let dir = src.join(format!("stickers/{:03}", i % 200));
        if i < 200 {
            fs::create_dir_all(&dir).unwrap();
        }
        fs::write(dir.join(format!("{i}.webp")), data).unwrap();
    }
    let (old, new) = (Device::new("old"), Device::new("new"));
    let dest = work.path().join("dest");
    let mut s = spawn_with_256_files(
        &old,
        "send",
        &[
            "send".as_ref(),
            src.as_os_str(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--no-mdns".as_ref(),
            "--json".as_ref(),
        ],
    );
    let (addr, code) = listening(&s.wait_event("listening", LONG));
    let mut r = spawn_with_256_files(
        &new,
        "receive",
        &[
            "receive".as_ref(),
            dest.as_os_str(),
            "--connect".as_ref(),
            addr.as_ref(),
            "--code".as_ref(),
            code.as_ref(),
            "--json".as_ref(),
        ],
    );
    let done = r.wait_any(&["done", "error"], LONG * 3);
    assert_eq!(done["event"], "done", "receiver: {done}\n{}", r.stderr());
    r.expect_exit(0, LONG);
    s.expect_exit(0, LONG);
    assert_eq!(u64_of(&done, "files"), 20_000);
    let diffs = tree_diff(&src, &dest).unwrap();
    assert!(
        diffs.is_empty(),
        "trees differ: {:?}",
        &diffs[..diffs.len().min(5)]
    );
    let (code, err) = verify(&dest);
    assert_eq!(code, 0, "ferry verify failed: {err}");
}
