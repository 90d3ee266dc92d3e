//! ferry's own files are private: folders it creates for itself are `0700`, files `0600`, so a
//! chat history never sits readable by other local users while it moves (snapshots, hash caches,
//! staging files, journals, receipts). The modes are given at creation (never created wider and
//! narrowed later), and folders that already exist are narrowed when ferry opens them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Mode of ferry's own folders.
pub const DIR_MODE: u32 = 0o700;
/// Mode of ferry's own files.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` and any missing parents as owner-only folders, and makes `dir` itself
/// owner-only if it already existed (a folder left by an older version of ferry).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)?;
        let md = fs::symlink_metadata(dir)?;
        if md.is_dir() && md.permissions().mode() & 0o7777 != DIR_MODE {
            // Through a handle that cannot follow a symlink planted in its place.
            let f = open_dir_nofollow(dir)?;
            f.set_permissions(fs::Permissions::from_mode(DIR_MODE))?;
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        fs::create_dir_all(dir)
    }
}

#[cfg(unix)]
fn open_dir_nofollow(dir: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
}

/// Options that create files owner-only (`0600`); the caller adds read/write/create flags.
pub fn options() -> OpenOptions {
    #[allow(unused_mut)]
    let mut o = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(FILE_MODE);
    }
    o
}

/// Creates (or truncates) an owner-only file for writing. A file that already existed keeps its
/// inode but is narrowed to `0600` too.
pub fn create(path: &Path) -> io::Result<File> {
    let f = options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    narrow(&f)?;
    Ok(f)
}

/// Writes `bytes` to an owner-only file (not atomically; see [`write_atomic`]).
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    create(path)?.write_all(bytes)
}

/// Writes `bytes` to `path` through an owner-only temporary file next to it and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

/// Makes an open file of ferry's owner-only, if it is not already.
pub fn narrow(f: &File) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if f.metadata()?.permissions().mode() & 0o7777 != FILE_MODE {
            f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
        }
    }
    #[cfg(not(unix))]
    let _ = f;
    Ok(())
}

/// The process's file mode creation mask: what the user wants taken away from the modes of
/// files ferry creates for them (a sender's mode is masked by it). Read without changing it
/// (`/proc/self/status`, Linux 4.7+); `0o022` where it cannot be read.
pub fn umask() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .map_or(0o022, |m| m & 0o777)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn folders_and_files_are_owner_only() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("a/b/c");
        create_dir_all(&deep).unwrap();
        for p in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&d.path().join(p)), 0o700, "{p}");
        }
        // An existing wide folder is narrowed; an existing wide file too.
        let wide = d.path().join("wide");
        fs::create_dir(&wide).unwrap();
        fs::set_permissions(&wide, fs::Permissions::from_mode(0o755)).unwrap();
        create_dir_all(&wide).unwrap();
        assert_eq!(mode(&wide), 0o700);
        let f = wide.join("f");
        fs::write(&f, b"old").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&f, b"new").unwrap();
        assert_eq!(mode(&f), 0o600);
        assert_eq!(fs::read(&f).unwrap(), b"new");
        write(&f, b"again").unwrap();
        assert_eq!(mode(&f), 0o600);
    }

    #[test]
    fn umask_is_read_without_changing_it() {
        let a = umask();
        assert_eq!(a, umask());
        assert_eq!(a & !0o777, 0);
    }
}
