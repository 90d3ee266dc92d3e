//! Compare two directory trees: file sets, kinds, sizes, contents and symlink targets.
//!
//! A `.ferry` directory at the root of either tree (ferry's own state) is ignored.
//! Permissions and timestamps are not compared.
//!
//! [`history_diff`] compares a live history with what a migration delivered: SQLite databases
//! (found by their header) are compared by content — schema, `user_version` and every row of
//! every table — instead of bytes, the right-hand copy must pass `PRAGMA integrity_check`, and
//! the databases' `-wal`/`-shm`/`-journal` companions are ignored on both sides (ferry sends a
//! self-contained snapshot in their place).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// Sockets, FIFOs, devices.
    Other,
}

/// One way two trees differ; paths are relative to the tree roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    OnlyInLeft(PathBuf),
    OnlyInRight(PathBuf),
    Kind {
        path: PathBuf,
        left: EntryKind,
        right: EntryKind,
    },
    Size {
        path: PathBuf,
        left: u64,
        right: u64,
    },
    /// Same size, different bytes; `offset` is the first differing byte.
    Content {
        path: PathBuf,
        offset: u64,
    },
    SymlinkTarget {
        path: PathBuf,
        left: PathBuf,
        right: PathBuf,
    },
    /// Two SQLite databases differ in content, or the right one is damaged.
    Database {
        path: PathBuf,
        problem: String,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::OnlyInLeft(p) => write!(f, "only in left: {}", p.display()),
            Difference::OnlyInRight(p) => write!(f, "only in right: {}", p.display()),
            Difference::Kind { path, left, right } => {
                write!(f, "{}: {left:?} vs {right:?}", path.display())
            }
            Difference::Size { path, left, right } => {
                write!(f, "{}: size {left} vs {right}", path.display())
            }
            Difference::Content { path, offset } => {
                write!(f, "{}: contents differ at byte {offset}", path.display())
            }
            Difference::SymlinkTarget { path, left, right } => write!(
                f,
                "{}: symlink to {} vs {}",
                path.display(),
                left.display(),
                right.display()
            ),
            Difference::Database { path, problem } => {
                write!(f, "{}: database {problem}", path.display())
            }
        }
    }
}

struct Entry {
    kind: EntryKind,
    len: u64,
}

fn walk(root: &Path) -> anyhow::Result<BTreeMap<PathBuf, Entry>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for entry in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let entry = entry.with_context(|| format!("read {}", dir.display()))?;
            if rel.as_os_str().is_empty() && entry.file_name() == ".ferry" {
                continue;
            }
            let path = rel.join(entry.file_name());
            let meta = fs::symlink_metadata(entry.path())
                .with_context(|| format!("stat {}", entry.path().display()))?;
            let ft = meta.file_type();
            let kind = if ft.is_symlink() {
                EntryKind::Symlink
            } else if ft.is_dir() {
                stack.push(path.clone());
                EntryKind::Dir
            } else if ft.is_file() {
                EntryKind::File
            } else {
                EntryKind::Other
            };
            out.insert(
                path,
                Entry {
                    kind,
                    len: meta.len(),
                },
            );
        }
    }
    Ok(out)
}

/// First differing byte offset of two files of equal size, if any.
fn first_difference(a: &Path, b: &Path) -> anyhow::Result<Option<u64>> {
    const BUF: usize = 256 * 1024;
    let mut fa = File::open(a).with_context(|| format!("open {}", a.display()))?;
    let mut fb = File::open(b).with_context(|| format!("open {}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; BUF], vec![0u8; BUF]);
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba).with_context(|| format!("read {}", a.display()))?;
        let nb = read_full(&mut fb, &mut bb).with_context(|| format!("read {}", b.display()))?;
        let n = na.min(nb);
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(offset + i as u64));
        }
        if na != nb {
            return Ok(Some(offset + n as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        offset += n as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// All differences between the trees at `left` and `right`, in path order.
pub fn tree_diff(left: &Path, right: &Path) -> anyhow::Result<Vec<Difference>> {
    diff(left, right, false)
}

/// Like [`tree_diff`], but SQLite databases are compared by content and their companions are
/// ignored (see the module docs).
pub fn history_diff(left: &Path, right: &Path) -> anyhow::Result<Vec<Difference>> {
    diff(left, right, true)
}

/// Whether the file starts with the SQLite header.
pub fn is_sqlite(path: &Path) -> bool {
    let mut head = [0u8; 16];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == b"SQLite format 3\0"
}

fn diff(left: &Path, right: &Path, histories: bool) -> anyhow::Result<Vec<Difference>> {
    let mut l = walk(left)?;
    let mut r = walk(right)?;
    let mut databases = std::collections::BTreeSet::new();
    if histories {
        for (side, tree) in [(left, &l), (right, &r)] {
            for (path, e) in tree {
                if e.kind == EntryKind::File && is_sqlite(&side.join(path)) {
                    databases.insert(path.clone());
                }
            }
        }
        for db in &databases {
            for suffix in ["-wal", "-shm", "-journal"] {
                let mut c = db.as_os_str().to_os_string();
                c.push(suffix);
                l.remove(Path::new(&c));
                r.remove(Path::new(&c));
            }
        }
    }
    let mut diffs = Vec::new();
    for (path, le) in &l {
        let Some(re) = r.get(path) else {
            diffs.push(Difference::OnlyInLeft(path.clone()));
            continue;
        };
        if le.kind != re.kind {
            diffs.push(Difference::Kind {
                path: path.clone(),
                left: le.kind,
                right: re.kind,
            });
            continue;
        }
        match le.kind {
            EntryKind::File if le.len != re.len && !databases.contains(path) => {
                diffs.push(Difference::Size {
                    path: path.clone(),
                    left: le.len,
                    right: re.len,
                })
            }
            EntryKind::File if databases.contains(path) => {
                if let Some(problem) = database_difference(&left.join(path), &right.join(path))? {
                    diffs.push(Difference::Database {
                        path: path.clone(),
                        problem,
                    });
                }
            }
            EntryKind::File => {
                if let Some(offset) = first_difference(&left.join(path), &right.join(path))? {
                    diffs.push(Difference::Content {
                        path: path.clone(),
                        offset,
                    });
                }
            }
            EntryKind::Symlink => {
                let lt = fs::read_link(left.join(path))?;
                let rt = fs::read_link(right.join(path))?;
                if lt != rt {
                    diffs.push(Difference::SymlinkTarget {
                        path: path.clone(),
                        left: lt,
                        right: rt,
                    });
                }
            }
            EntryKind::Dir | EntryKind::Other => {}
        }
    }
    for path in r.keys().filter(|p| !l.contains_key(*p)) {
        diffs.push(Difference::OnlyInRight(path.clone()));
    }
    diffs.sort_by(|a, b| diff_path(a).cmp(diff_path(b)));
    Ok(diffs)
}

fn diff_path(d: &Difference) -> &Path {
    match d {
        Difference::OnlyInLeft(p) | Difference::OnlyInRight(p) => p,
        Difference::Kind { path, .. }
        | Difference::Size { path, .. }
        | Difference::Content { path, .. }
        | Difference::SymlinkTarget { path, .. }
        | Difference::Database { path, .. } => path,
    }
}

/// `Ok(())` if the trees are equal, else an error listing (up to 20 of) the differences.
pub fn assert_trees_equal(left: &Path, right: &Path) -> anyhow::Result<()> {
    report(left, right, tree_diff(left, right)?)
}

/// `Ok(())` if [`history_diff`] finds no difference, else an error listing them.
pub fn assert_histories_equal(left: &Path, right: &Path) -> anyhow::Result<()> {
    report(left, right, history_diff(left, right)?)
}

/// A digest of a database's content: schema, `user_version`, and every row of every table
/// (by rowid, or by primary key for `WITHOUT ROWID` tables), with a row count per table.
pub fn database_digest(path: &Path) -> anyhow::Result<Vec<(String, u64, u64)>> {
    use rusqlite::types::ValueRef;
    use std::hash::{Hash, Hasher};
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("open {}", path.display()))?;
    let mut out = Vec::new();
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let mut schema = std::collections::hash_map::DefaultHasher::new();
    let mut tables = Vec::new();
    {
        let mut st = conn.prepare(
            "SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master ORDER BY type, name",
        )?;
        let mut rows = st.query([])?;
        let mut n = 0u64;
        while let Some(row) = rows.next()? {
            let (ty, name, tbl, sql): (String, String, String, String) =
                (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
            (&ty, &name, &tbl, &sql).hash(&mut schema);
            if ty == "table" && !name.starts_with("sqlite_") {
                tables.push(name);
            }
            n += 1;
        }
        out.push((
            format!("schema (user_version {version})"),
            n,
            schema.finish(),
        ));
    }
    for t in tables {
        let quoted = t.replace('"', "\"\"");
        let mut st = match conn.prepare(&format!("SELECT * FROM \"{quoted}\" ORDER BY rowid")) {
            Ok(st) => st,
            Err(_) => conn.prepare(&format!("SELECT * FROM \"{quoted}\""))?,
        };
        let cols = st.column_count();
        let mut rows = st.query([])?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut n = 0u64;
        while let Some(row) = rows.next()? {
            for i in 0..cols {
                match row.get_ref(i)? {
                    ValueRef::Null => 0u8.hash(&mut h),
                    ValueRef::Integer(v) => (1u8, v).hash(&mut h),
                    ValueRef::Real(v) => (2u8, v.to_bits()).hash(&mut h),
                    ValueRef::Text(v) => (3u8, v).hash(&mut h),
                    ValueRef::Blob(v) => (4u8, v).hash(&mut h),
                }
            }
            n += 1;
        }
        out.push((format!("table {t}"), n, h.finish()));
    }
    Ok(out)
}

/// `PRAGMA integrity_check` of the database at `path`: `Ok(())` when it says "ok".
pub fn integrity_check(path: &Path) -> anyhow::Result<()> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("open {}", path.display()))?;
    let mut st = conn.prepare("PRAGMA integrity_check")?;
    let lines: Vec<String> = st
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    anyhow::ensure!(
        lines == ["ok"],
        "{}: integrity_check says {}",
        path.display(),
        lines.join("; ")
    );
    Ok(())
}

fn database_difference(left: &Path, right: &Path) -> anyhow::Result<Option<String>> {
    if let Err(e) = integrity_check(right) {
        return Ok(Some(format!("{e:#}")));
    }
    let (l, r) = match (database_digest(left), database_digest(right)) {
        (Ok(l), Ok(r)) => (l, r),
        (Err(e), _) | (_, Err(e)) => return Ok(Some(format!("cannot be read: {e:#}"))),
    };
    if l == r {
        return Ok(None);
    }
    for (a, b) in l.iter().zip(&r) {
        if a != b {
            return Ok(Some(format!(
                "differs: {} has {} rows vs {} (or other content)",
                a.0, a.1, b.1
            )));
        }
    }
    Ok(Some(format!(
        "differs: {} vs {} tables",
        l.len().saturating_sub(1),
        r.len().saturating_sub(1)
    )))
}

fn report(left: &Path, right: &Path, diffs: Vec<Difference>) -> anyhow::Result<()> {
    if diffs.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "{} and {} differ in {} place(s):",
        left.display(),
        right.display(),
        diffs.len()
    );
    for d in diffs.iter().take(20) {
        msg.push_str("\n  ");
        msg.push_str(&d.to_string());
    }
    anyhow::bail!(msg)
}
