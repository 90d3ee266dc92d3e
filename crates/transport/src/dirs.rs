//! Where ferry keeps its files: `FerryDirs { config, state, cache }`.
//!
//! Resolution order: `FERRY_HOME` (→ `$FERRY_HOME/config`, `/state`, `/cache`), else the XDG
//! variables (`XDG_CONFIG_HOME`, `XDG_STATE_HOME`, `XDG_CACHE_HOME`, each + `/ferry`), else
//! `$HOME/.config/ferry`, `$HOME/.local/state/ferry`, `$HOME/.cache/ferry`. The environment is an
//! explicit input so tests never mutate the process environment; two devices on one machine are
//! simply two `FERRY_HOME`s.

use std::ffi::OsString;
use std::path::PathBuf;

/// Error resolving [`FerryDirs`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirsError {
    /// None of `FERRY_HOME`, the XDG variables or `HOME` is set (or they are empty/relative).
    #[error("cannot locate ferry's directories: set FERRY_HOME or HOME")]
    NoHome,
}

/// ferry's directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FerryDirs {
    /// Identity (key, certificate, device name) and the peers file. Owner-only.
    pub config: PathBuf,
    /// The sender's state: database snapshots, hash caches, the port it used last. Owner-only:
    /// the sender creates it `0700` (files `0600`) and narrows one left wider.
    pub state: PathBuf,
    /// Disposable caches.
    pub cache: PathBuf,
}

impl FerryDirs {
    /// Resolves the directories from the process environment.
    pub fn from_env() -> Result<Self, DirsError> {
        Self::from_env_vars(|k| std::env::var_os(k))
    }

    /// Resolves the directories from an explicit environment lookup.
    pub fn from_env_vars(get: impl Fn(&str) -> Option<OsString>) -> Result<Self, DirsError> {
        let abs = |k: &str| {
            get(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        if let Some(home) = abs("FERRY_HOME") {
            return Ok(Self::under(home));
        }
        let home = abs("HOME");
        let pick = |xdg: &str, fallback: &[&str]| -> Result<PathBuf, DirsError> {
            if let Some(p) = abs(xdg) {
                return Ok(p.join("ferry"));
            }
            let mut p = home.clone().ok_or(DirsError::NoHome)?;
            for part in fallback {
                p.push(part);
            }
            p.push("ferry");
            Ok(p)
        };
        Ok(Self {
            config: pick("XDG_CONFIG_HOME", &[".config"])?,
            state: pick("XDG_STATE_HOME", &[".local", "state"])?,
            cache: pick("XDG_CACHE_HOME", &[".cache"])?,
        })
    }

    /// All three directories under one root (what `FERRY_HOME` selects).
    pub fn under(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Self {
            config: root.join("config"),
            state: root.join("state"),
            cache: root.join("cache"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let m: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn ferry_home_wins() {
        let d = FerryDirs::from_env_vars(env(&[("FERRY_HOME", "/f"), ("HOME", "/h")])).unwrap();
        assert_eq!(d, FerryDirs::under("/f"));
        assert_eq!(d.config, PathBuf::from("/f/config"));
    }

    #[test]
    fn xdg_then_home() {
        let d =
            FerryDirs::from_env_vars(env(&[("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")])).unwrap();
        assert_eq!(d.config, PathBuf::from("/x/ferry"));
        assert_eq!(d.state, PathBuf::from("/h/.local/state/ferry"));
        assert_eq!(d.cache, PathBuf::from("/h/.cache/ferry"));
    }

    #[test]
    fn nothing_set_is_an_error() {
        assert!(matches!(
            FerryDirs::from_env_vars(env(&[])),
            Err(DirsError::NoHome)
        ));
        // Relative values are ignored, not trusted.
        assert!(FerryDirs::from_env_vars(env(&[("FERRY_HOME", "rel")])).is_err());
    }
}
