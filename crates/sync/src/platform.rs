//! Process-level settings that differ between operating systems.

/// Raises the soft limit on open files to the hard limit (on macOS, to at most `OPEN_MAX`, which
/// is what the kernel accepts). ferry bounds its own descriptors, but SQLite, the runtime and
/// the file system walk need some too, and a default soft limit of 256 (macOS) or 1024 leaves
/// little room. Returns the soft limit in force afterwards (`None`: unlimited or unknown).
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let now = getrlimit(Resource::Nofile);
        #[cfg(target_vendor = "apple")]
        let max = Some(now.maximum.map_or(10_240, |m| m.min(10_240)));
        #[cfg(not(target_vendor = "apple"))]
        let max = now.maximum;
        let wanted = match (now.current, max) {
            (Some(cur), Some(max)) if cur < max => Some(max),
            (Some(cur), None) => Some(cur.max(1 << 20)),
            _ => None,
        };
        if let Some(w) = wanted {
            let new = Rlimit {
                current: Some(w),
                maximum: now.maximum,
            };
            if setrlimit(Resource::Nofile, new).is_ok() {
                return Some(w);
            }
        }
        now.current
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Space of the file system holding a path, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsSpace {
    /// Free to an unprivileged user.
    pub available: u64,
    /// In use (by anything on that file system).
    pub used: u64,
}

/// The space of the file system holding `path`; `None` when it cannot be read.
pub fn fs_space(path: &std::path::Path) -> Option<FsSpace> {
    #[cfg(unix)]
    {
        let st = rustix::fs::statvfs(path).ok()?;
        let unit = st.f_frsize;
        Some(FsSpace {
            available: st.f_bavail.saturating_mul(unit),
            used: st.f_blocks.saturating_sub(st.f_bfree).saturating_mul(unit),
        })
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Memory the system can give to a new allocation without swapping (Linux `MemAvailable`);
/// `None` elsewhere or when unknown.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}
