//! Path safety: every path in a manifest is untrusted until it passes [`check_relative_path`].
//!
//! A manifest path is a relative, `/`-separated UTF-8 path. It may not be absolute, contain
//! empty, `.` or `..` components, contain NUL, exceed the platform's name or path length limits,
//! or name ferry's own state folder (`.ferry`, in any case: `.FERRY` is the same folder on a
//! case-insensitive destination) at the root. Escapes through symlinks are handled
//! by the manifest (an ancestor must be a directory entry) and by the store (it never follows a
//! symlink it finds on disk while creating parents).

use std::fmt;

/// Name of the folder inside a destination that holds ferry's own state.
pub const STATE_DIR: &str = ".ferry";
/// Whether a name at the root of a destination is ferry's state folder on some file system:
/// compared without regard to case, as exFAT, FAT, NTFS, APFS and HFS+ compare names. (No
/// other Unicode spelling of `.ferry` exists: no character folds or decomposes canonically to
/// `.`, `f`, `e`, `r` or `y`, so normalising file systems add none.)
pub fn is_state_dir(name: &str) -> bool {
    name.eq_ignore_ascii_case(STATE_DIR)
}

/// Longest path (in bytes) a manifest may carry.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest single component (in bytes), as on ext4, APFS, NTFS.
pub const MAX_NAME_BYTES: usize = 255;
/// Deepest nesting accepted.
pub const MAX_DEPTH: usize = 128;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathProblem {
    Empty,
    Absolute,
    TooLong,
    NameTooLong,
    TooDeep,
    EmptyComponent,
    DotComponent,
    ParentComponent,
    Nul,
    Backslash,
    Reserved,
}

impl fmt::Display for PathProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathProblem::Empty => "the path is empty",
            PathProblem::Absolute => "the path is absolute",
            PathProblem::TooLong => "the path is longer than 4096 bytes",
            PathProblem::NameTooLong => "a name in the path is longer than 255 bytes",
            PathProblem::TooDeep => "the path is nested more than 128 levels deep",
            PathProblem::EmptyComponent => "the path has an empty component",
            PathProblem::DotComponent => "the path has a '.' component",
            PathProblem::ParentComponent => "the path has a '..' component",
            PathProblem::Nul => "the path contains a NUL byte",
            PathProblem::Backslash => "the path contains a backslash",
            PathProblem::Reserved => "the path names ferry's own state folder .ferry (in any case)",
        })
    }
}

/// Checks a manifest path. Returns the problem, if any.
pub fn check_relative_path(path: &str) -> Result<(), PathProblem> {
    if path.is_empty() {
        return Err(PathProblem::Empty);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathProblem::TooLong);
    }
    if path.starts_with('/') {
        return Err(PathProblem::Absolute);
    }
    if path.contains('\0') {
        return Err(PathProblem::Nul);
    }
    // A backslash is a separator (and `C:\` a root) on Windows; refusing it keeps a manifest
    // meaningful on every platform a receiver may run on.
    if path.contains('\\') {
        return Err(PathProblem::Backslash);
    }
    let mut depth = 0;
    for (i, part) in path.split('/').enumerate() {
        depth += 1;
        match part {
            "" => return Err(PathProblem::EmptyComponent),
            "." => return Err(PathProblem::DotComponent),
            ".." => return Err(PathProblem::ParentComponent),
            _ => {}
        }
        if part.len() > MAX_NAME_BYTES {
            return Err(PathProblem::NameTooLong);
        }
        if i == 0 && is_state_dir(part) {
            return Err(PathProblem::Reserved);
        }
    }
    if depth > MAX_DEPTH {
        return Err(PathProblem::TooDeep);
    }
    Ok(())
}

/// Whether a symlink at `link_path` pointing at `target` stays inside the root, judged lexically:
/// the target is relative, its `..` components come before any name and never climb above the
/// root. (A `..` after a name would be resolved from wherever that name leads, which may be
/// another symlink, so it cannot be judged from the text.)
pub fn symlink_stays_inside(link_path: &str, target: &str) -> bool {
    if target.is_empty()
        || target.starts_with('/')
        || target.contains('\0')
        || target.contains('\\')
    {
        return false;
    }
    // Depth of the directory holding the link.
    let mut depth: i64 = link_path.split('/').count() as i64 - 1;
    let mut descended = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                // `..` after a name is resolved by the kernel from wherever that name leads, not
                // lexically: with "d/s" -> "..", the target "d/s/.." is the destination's
                // parent. Climbing is only judged sound before the first name, where every
                // component is a real directory holding the link.
                if descended {
                    return false;
                }
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => {
                descended = true;
                depth += 1;
            }
        }
    }
    true
}

/// The parent of a manifest path, if it has one.
pub fn parent(path: &str) -> Option<&str> {
    path.rfind('/').map(|i| &path[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_paths() {
        for p in [
            "a",
            "db/msg_0.db",
            "media/ab/abc.jpg",
            "文档/照片 1.jpg",
            "😀/x",
            ".ferryx",
            "a/.ferry",
        ] {
            assert_eq!(check_relative_path(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn rejects_escapes_and_oddities() {
        let cases = [
            ("", PathProblem::Empty),
            ("/etc/passwd", PathProblem::Absolute),
            ("../x", PathProblem::ParentComponent),
            ("a/../../x", PathProblem::ParentComponent),
            ("a/./b", PathProblem::DotComponent),
            ("a//b", PathProblem::EmptyComponent),
            ("a/", PathProblem::EmptyComponent),
            ("a\0b", PathProblem::Nul),
            ("..\\x", PathProblem::Backslash),
            (".ferry", PathProblem::Reserved),
            (".ferry/journal", PathProblem::Reserved),
            // The same folder on exFAT, FAT, NTFS and APFS.
            (".FERRY", PathProblem::Reserved),
            (".Ferry/staging/x", PathProblem::Reserved),
        ];
        for (p, want) in cases {
            assert_eq!(check_relative_path(p), Err(want), "{p:?}");
        }
        assert_eq!(
            check_relative_path(&"a".repeat(256)),
            Err(PathProblem::NameTooLong)
        );
        assert_eq!(
            check_relative_path(&"a/".repeat(3000)),
            Err(PathProblem::TooLong)
        );
        assert_eq!(
            check_relative_path("a/".repeat(200).trim_end_matches('/')),
            Err(PathProblem::TooDeep)
        );
    }

    #[test]
    fn symlink_targets() {
        assert!(symlink_stays_inside("a/link", "b"));
        assert!(symlink_stays_inside("a/link", "../b"));
        assert!(!symlink_stays_inside("a/link", "../../b"));
        assert!(!symlink_stays_inside("link", "/etc/passwd"));
        assert!(!symlink_stays_inside("link", ".."));
        assert!(symlink_stays_inside("a/b/link", "../../c/./d"));
        // Lexically inside, but resolved through another symlink it escapes: with "d/s" -> ".."
        // (allowed: it names the root), "d/s/.." is the root's parent.
        assert!(symlink_stays_inside("d/s", ".."));
        assert!(!symlink_stays_inside("t", "d/s/.."));
        assert!(!symlink_stays_inside("a/t", "../d/s/../x"));
    }
}
