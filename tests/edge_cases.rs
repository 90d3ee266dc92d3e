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
