//! Exit codes: part of the command contract (documented in the README).

use std::fmt;

use ferry_sync::driver::DriveError;
use ferry_sync::manifest::ManifestError;
use ferry_sync::proto::{CloseCode, FrameError, SessionError};
use ferry_sync::store::StoreError;

use crate::output::escape;

/// Why ferry stopped. The discriminant is the process exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Internal = 1,
    Usage = 2,
    Pairing = 3,
    Unreachable = 4,
    Interrupted = 5,
    Destination = 6,
    Integrity = 7,
    Source = 8,
    Protocol = 9,
    /// The migration finished, but some files kept changing and were not sent.
    Incomplete = 10,
}

impl Exit {
    /// The `kind` of a JSON error event.
    pub fn kind(self) -> &'static str {
        match self {
            Exit::Internal => "internal",
            Exit::Usage => "usage",
            Exit::Pairing => "pairing",
            Exit::Unreachable => "unreachable",
            Exit::Interrupted => "interrupted",
            Exit::Destination => "destination",
            Exit::Integrity => "integrity",
            Exit::Source => "source",
            Exit::Protocol => "protocol",
            Exit::Incomplete => "incomplete",
        }
    }
}

/// A failure to report: what happened and what the user can do, with its exit code.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure {
            exit,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let exit = match e {
            StoreError::BadReceipt { .. } | StoreError::NoReceipt(_) => Exit::Integrity,
            _ => Exit::Destination,
        };
        // Store errors name destination paths, which came from the sender.
        Failure::new(
            exit,
            format!("{}{}", escape(&e.to_string()), store_advice(&e)),
        )
    }
}

/// What to do about a store failure: ferry-sync states what happened, the command line says
/// what to do next.
fn store_advice(e: &StoreError) -> String {
    const KEPT: &str = " (what already arrived is kept)";
    match e {
        StoreError::NoSpace { .. } => ": free some space and run the same command again".into(),
        StoreError::PermissionDenied { .. } => {
            ": fix the destination's permissions and run the same command again".into()
        }
        StoreError::ReadOnly { .. } => format!(
            ": make it writable (remount it read-write, or choose another destination) and run \
             the same command again{KEPT}"
        ),
        StoreError::Io { .. } => format!("; fix it and run the same command again{KEPT}"),
        StoreError::InsufficientSpace {
            needed, available, ..
        } => format!(
            "; free up at least {} and run the same command again{KEPT}",
            ferry_sync::store::mib(needed.saturating_sub(*available))
        ),
        StoreError::Conflict { .. } => "; move it away and run again".into(),
        _ => String::new(),
    }
}

/// Maps a session error to an exit code and a message that says what to do. The error's text
/// (the peer's close reason, paths from its manifest) is escaped for the terminal.
pub fn from_session(e: &SessionError) -> Failure {
    if let SessionError::PeerClosed {
        code: Some(CloseCode::SourceError),
        reason,
    } = e
    {
        // The sender names the file it cannot read; what arrived here stays verified.
        return Failure::new(
            Exit::Source,
            format!(
                "the sender stopped: {}; fix that on the old device, then run `ferry send` there and this command again (what arrived is kept)",
                escape(reason)
            ),
        );
    }
    if let SessionError::Manifest(ManifestError::CaseCollision { path, other }) = e {
        // The names come from the peer: `{:?}` escapes anything a terminal would act on.
        return Failure::new(
            Exit::Destination,
            format!(
                "the history has both {other:?} and {path:?}, but the destination's file system \
                 does not tell upper and lower case apart (exFAT/FAT drive, macOS, Windows): one \
                 would overwrite the other. Nothing was written. Receive into a folder on a \
                 case-sensitive file system (ext4, btrfs, APFS case-sensitive), or rename one of \
                 them on the old device and run the same command again"
            ),
        );
    }
    let (exit, hint) = match e {
        SessionError::PeerClosed { code, .. } => match code {
            Some(CloseCode::SourceError) => (Exit::Source, ""),
            Some(CloseCode::DestinationError) => (Exit::Destination, ""),
            Some(CloseCode::IntegrityFailure) => (Exit::Integrity, ""),
            Some(CloseCode::UnsupportedVersion) => {
                (Exit::Protocol, " (update ferry on both devices)")
            }
            Some(CloseCode::ProtocolViolation | CloseCode::ManifestRejected) => {
                (Exit::Protocol, "")
            }
            _ => (
                Exit::Interrupted,
                "; run the same command again to continue",
            ),
        },
        SessionError::Frame(FrameError::UnsupportedVersion { .. }) => (Exit::Protocol, ""),
        SessionError::Manifest(ManifestError::NoSpace { .. }) => (
            Exit::Destination,
            "; free up space there (or choose another destination) and run the same command again",
        ),
        SessionError::Manifest(ManifestError::MemoryBudget { .. }) => (
            Exit::Protocol,
            "; ferry allows a manifest half the memory available (at most 4 GiB): if the old device's \
             history really holds that many files, close other programs or use a device with more memory",
        ),
        SessionError::Protocol(_) | SessionError::Frame(_) | SessionError::Manifest(_) => (
            Exit::Protocol,
            "; nothing invalid was written, and what was verified is kept",
        ),
        SessionError::Integrity(_) => (Exit::Integrity, ""),
        SessionError::Source(_) => (Exit::Source, ""),
        SessionError::Destination(_) => (Exit::Destination, ""),
        _ => (Exit::Internal, ""),
    };
    let advice = match e {
        SessionError::Destination(store) => store_advice(store),
        _ => String::new(),
    };
    Failure::new(exit, format!("{}{hint}{advice}", escape(&e.to_string())))
}

pub fn from_drive(e: &DriveError) -> Failure {
    match e {
        DriveError::Session(s) => from_session(s),
        DriveError::LinkLost(why) => Failure::new(
            Exit::Interrupted,
            format!(
                "the connection was lost ({}); run the same command again to continue",
                escape(why)
            ),
        ),
        _ => Failure::new(Exit::Internal, escape(&e.to_string())),
    }
}
