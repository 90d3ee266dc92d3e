//! Compare two directory trees: file sets, kinds, sizes, contents and symlink targets.
//!
//! A `.ferry` directory at the root of either tree (ferry's own state) is ignored.
//! Permissions and timestamps are not compared.

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
    let l = walk(left)?;
    let r = walk(right)?;
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
            EntryKind::File if le.len != re.len => diffs.push(Difference::Size {
                path: path.clone(),
                left: le.len,
                right: re.len,
            }),
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
        | Difference::SymlinkTarget { path, .. } => path,
    }
}

/// `Ok(())` if the trees are equal, else an error listing (up to 20 of) the differences.
pub fn assert_trees_equal(left: &Path, right: &Path) -> anyhow::Result<()> {
    let diffs = tree_diff(left, right)?;
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
