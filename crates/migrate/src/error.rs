//! Why a migration stopped: one [`Error`] variant per class of failure, each with a message that
//! says what happened and what to do, and the typed cause underneath ([`Cause`]).
//!
//! The classes are the CLI's exit codes ([`Error::exit_code`]); the table is in the crate docs.

use std::fmt;

use ferry_sync::driver::DriveError;
use ferry_sync::manifest::ManifestError;
use ferry_sync::proto::{CloseCode, FrameError, SessionError};
use ferry_sync::scan::ScanError;
use ferry_sync::store::StoreError;
use ferry_transport::{
    BindError, ConnectError, DirsError, DiscoveryError, IdentityError, PairingError, PeerStoreError,
};

use crate::text::escape;

/// The class of a failure; its discriminant is the `ferry` exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A bug or an environment that cannot run ferry at all (exit 1).
    Internal = 1,
    /// Bad options or input from the person (exit 2).
    Usage = 2,
    /// Pairing failed: wrong or missing code, a device not paired (exit 3).
    Pairing = 3,
    /// The other device cannot be reached (exit 4).
    Unreachable = 4,
    /// Stopped or cut off before the end; starting again continues (exit 5).
    Interrupted = 5,
    /// The destination cannot take the history (space, permissions, names) (exit 6).
    Destination = 6,
    /// Data failed verification (exit 7).
    Integrity = 7,
    /// The folder being sent cannot be read (exit 8).
    Source = 8,
    /// The peer speaks another protocol version or broke the protocol (exit 9).
    Protocol = 9,
    /// The migration finished, but files that kept changing were not sent (exit 10).
    Incomplete = 10,
}

impl ErrorKind {
    /// The `ferry` process exit code of this class.
    pub fn exit_code(self) -> u8 {
        self as u8
    }

    /// The `kind` field of a JSON `error` event.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Internal => "internal",
            ErrorKind::Usage => "usage",
            ErrorKind::Pairing => "pairing",
            ErrorKind::Unreachable => "unreachable",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::Destination => "destination",
            ErrorKind::Integrity => "integrity",
            ErrorKind::Source => "source",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Incomplete => "incomplete",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The typed error beneath an [`Error`]'s message, for callers that act on the detail (a full
/// disk, a wrong code, a version mismatch).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Cause {
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The connection went away (resumable).
    #[error("the connection was lost: {0}")]
    LinkLost(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Pairing(#[from] PairingError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Peers(#[from] PeerStoreError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Dirs(#[from] DirsError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<DriveError> for Cause {
    fn from(e: DriveError) -> Self {
        match e {
            DriveError::Session(s) => Cause::Session(s),
            DriveError::LinkLost(why) => Cause::LinkLost(why),
            other => Cause::LinkLost(other.to_string()),
        }
    }
}

/// Why a migration (or a step of one) stopped: the variant is the class (and the CLI's exit
/// code), `message` says what happened and what to do, `cause` is the typed error beneath.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{message}")]
    Internal {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    #[error("{message}")]
    Usage {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    #[error("{message}")]
    Pairing {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    #[error("{message}")]
    Unreachable {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    #[error("{message}")]
    Interrupted {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    #[error("{message}")]
    Destination {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    #[error("{message}")]
    Integrity {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    #[error("{message}")]
    Source {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    #[error("{message}")]
    Protocol {
        message: String,
        #[source]
        cause: Option<Cause>,
    },
    /// The migration finished and the receiver verified what was sent, but `unstable` files
    /// kept changing while read and were left out (the sender's verdict), or entries the
    /// destination cannot hold (`unrepresentable`: symlinks on exFAT) were left out there (the
    /// receiver's).
    #[error("{message}")]
    Incomplete {
        message: String,
        unstable: Vec<String>,
        unrepresentable: Vec<String>,
    },
}

impl Error {
    /// An error of class `kind` without a typed cause.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error::with_cause(kind, message, None)
    }

    /// An error of class `kind` with the typed error beneath it.
    pub fn with_cause(kind: ErrorKind, message: impl Into<String>, cause: Option<Cause>) -> Self {
        let message = message.into();
        match kind {
            ErrorKind::Internal => Error::Internal { message, cause },
            ErrorKind::Usage => Error::Usage { message, cause },
            ErrorKind::Pairing => Error::Pairing { message, cause },
            ErrorKind::Unreachable => Error::Unreachable { message, cause },
            ErrorKind::Interrupted => Error::Interrupted { message, cause },
            ErrorKind::Destination => Error::Destination { message, cause },
            ErrorKind::Integrity => Error::Integrity { message, cause },
            ErrorKind::Source => Error::Source { message, cause },
            ErrorKind::Protocol => Error::Protocol { message, cause },
            ErrorKind::Incomplete => Error::Incomplete {
                message,
                unstable: Vec::new(),
                unrepresentable: Vec::new(),
            },
        }
    }

    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Internal { .. } => ErrorKind::Internal,
            Error::Usage { .. } => ErrorKind::Usage,
            Error::Pairing { .. } => ErrorKind::Pairing,
            Error::Unreachable { .. } => ErrorKind::Unreachable,
            Error::Interrupted { .. } => ErrorKind::Interrupted,
            Error::Destination { .. } => ErrorKind::Destination,
            Error::Integrity { .. } => ErrorKind::Integrity,
            Error::Source { .. } => ErrorKind::Source,
            Error::Protocol { .. } => ErrorKind::Protocol,
            Error::Incomplete { .. } => ErrorKind::Incomplete,
        }
    }

    /// The `ferry` exit code for this error.
    pub fn exit_code(&self) -> u8 {
        self.kind().exit_code()
    }

    /// What happened and what to do (peer strings in it are escaped).
    pub fn message(&self) -> &str {
        match self {
            Error::Internal { message, .. }
            | Error::Usage { message, .. }
            | Error::Pairing { message, .. }
            | Error::Unreachable { message, .. }
            | Error::Interrupted { message, .. }
            | Error::Destination { message, .. }
            | Error::Integrity { message, .. }
            | Error::Source { message, .. }
            | Error::Protocol { message, .. }
            | Error::Incomplete { message, .. } => message,
        }
    }

    /// The typed error beneath, if any.
    pub fn cause(&self) -> Option<&Cause> {
        match self {
            Error::Internal { cause, .. }
            | Error::Usage { cause, .. }
            | Error::Pairing { cause, .. }
            | Error::Unreachable { cause, .. }
            | Error::Interrupted { cause, .. }
            | Error::Destination { cause, .. }
            | Error::Integrity { cause, .. }
            | Error::Source { cause, .. }
            | Error::Protocol { cause, .. } => cause.as_ref(),
            Error::Incomplete { .. } => None,
        }
    }

    /// The same error with `prefix` and `suffix` around its message (same class and cause).
    pub(crate) fn reworded(self, f: impl FnOnce(&str) -> String) -> Self {
        let kind = self.kind();
        let message = f(self.message());
        match self {
            Error::Incomplete {
                unstable,
                unrepresentable,
                ..
            } => Error::Incomplete {
                message,
                unstable,
                unrepresentable,
            },
            other => {
                let cause = other.into_cause();
                Error::with_cause(kind, message, cause)
            }
        }
    }

    fn into_cause(self) -> Option<Cause> {
        match self {
            Error::Internal { cause, .. }
            | Error::Usage { cause, .. }
            | Error::Pairing { cause, .. }
            | Error::Unreachable { cause, .. }
            | Error::Interrupted { cause, .. }
            | Error::Destination { cause, .. }
            | Error::Integrity { cause, .. }
            | Error::Source { cause, .. }
            | Error::Protocol { cause, .. } => cause,
            Error::Incomplete { .. } => None,
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        let kind = match e {
            StoreError::BadReceipt { .. } => ErrorKind::Integrity,
            // Not tampering: a folder no migration finished in (the wrong folder, or one still
            // receiving) has nothing to check against.
            StoreError::NoReceipt(_) => ErrorKind::Usage,
            _ => ErrorKind::Destination,
        };
        // Store errors name destination paths, which came from the sender.
        let message = match &e {
            StoreError::NoReceipt(p) if !p.exists() => {
                format!("{} does not exist", escape(&p.display().to_string()))
            }
            _ => format!("{}{}", escape(&e.to_string()), store_advice(&e)),
        };
        Error::with_cause(kind, message, Some(Cause::Store(e)))
    }
}

/// What to do about a store failure: ferry-sync states what happened, the migration says what
/// to do next.
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

/// Maps a session error to its class and a message that says what to do. The error's text
/// (the peer's close reason, paths from its manifest) is escaped for the terminal.
pub(crate) fn from_session(e: SessionError) -> Error {
    if let SessionError::PeerClosed {
        code: Some(CloseCode::SourceError),
        reason,
    } = &e
    {
        // The sender names the file it cannot read; what arrived here stays verified.
        let message = format!(
            "the sender stopped: {}; fix that on the old device, then run `ferry send` there and this command again (what arrived is kept)",
            escape(reason)
        );
        return Error::with_cause(ErrorKind::Source, message, Some(Cause::Session(e)));
    }
    if let SessionError::Manifest(ManifestError::CaseCollision { path, other }) = &e {
        // The names come from the peer: `{:?}` escapes anything a terminal would act on.
        let message = format!(
            "the history has both {other:?} and {path:?}, but the destination's file system \
             does not tell upper and lower case apart (exFAT/FAT drive, macOS, Windows): one \
             would overwrite the other. Nothing was written. Receive into a folder on a \
             case-sensitive file system (ext4, btrfs, APFS case-sensitive), or rename one of \
             them on the old device and run the same command again"
        );
        return Error::with_cause(ErrorKind::Destination, message, Some(Cause::Session(e)));
    }
    let (kind, hint) = session_class(&e);
    let advice = match &e {
        SessionError::Destination(store) => store_advice(store),
        _ => String::new(),
    };
    let message = format!("{}{hint}{advice}", escape(&e.to_string()));
    Error::with_cause(kind, message, Some(Cause::Session(e)))
}

/// The class of a session error and the advice added to its text.
fn session_class(e: &SessionError) -> (ErrorKind, &'static str) {
    match e {
        SessionError::PeerClosed { code, .. } => match code {
            Some(CloseCode::SourceError) => (ErrorKind::Source, ""),
            Some(CloseCode::DestinationError) => (ErrorKind::Destination, ""),
            Some(CloseCode::IntegrityFailure) => (ErrorKind::Integrity, ""),
            Some(CloseCode::UnsupportedVersion) => {
                (ErrorKind::Protocol, " (update ferry on both devices)")
            }
            Some(CloseCode::ProtocolViolation | CloseCode::ManifestRejected) => {
                (ErrorKind::Protocol, "")
            }
            _ => (
                ErrorKind::Interrupted,
                "; run the same command again to continue",
            ),
        },
        SessionError::Frame(FrameError::UnsupportedVersion { .. }) => (ErrorKind::Protocol, ""),
        SessionError::Manifest(ManifestError::NoSpace { .. }) => (
            ErrorKind::Destination,
            "; free up space there (or choose another destination) and run the same command again",
        ),
        SessionError::Manifest(ManifestError::MemoryBudget { .. }) => (
            ErrorKind::Protocol,
            "; ferry allows a manifest half the memory available (at most 4 GiB): if the old device's \
             history really holds that many files, close other programs or use a device with more memory",
        ),
        SessionError::Protocol(_) | SessionError::Frame(_) | SessionError::Manifest(_) => (
            ErrorKind::Protocol,
            "; nothing invalid was written, and what was verified is kept",
        ),
        SessionError::Integrity(_) => (ErrorKind::Integrity, ""),
        SessionError::Source(_) => (ErrorKind::Source, ""),
        SessionError::Destination(_) => (ErrorKind::Destination, ""),
        _ => (ErrorKind::Internal, ""),
    }
}

/// Maps the end of a failed session (protocol, or a lost link) to an error.
pub(crate) fn from_drive(e: DriveError) -> Error {
    match e {
        DriveError::Session(s) => from_session(s),
        DriveError::LinkLost(why) => {
            // The reason often says no more than "connection lost" itself.
            let reason = match why.as_str() {
                "" | "connection lost" | "the connection was lost" => String::new(),
                w => format!(" ({})", escape(w)),
            };
            let message =
                format!("the connection was lost{reason}; run the same command again to continue");
            Error::with_cause(ErrorKind::Interrupted, message, Some(Cause::LinkLost(why)))
        }
        other => Error::new(ErrorKind::Internal, escape(&other.to_string())),
    }
}

/// What ended a session, for an `interrupted` event: a lost link's own reason, or the error.
pub(crate) fn interruption(e: &DriveError) -> String {
    match e {
        DriveError::LinkLost(why) => why.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lost link whose reason repeats it is said once: not "the connection was lost
    /// (connection lost)".
    #[test]
    fn a_lost_link_is_said_once() {
        let f = from_drive(DriveError::LinkLost("connection lost".into()));
        assert_eq!(
            f.message(),
            "the connection was lost; run the same command again to continue"
        );
        let f = from_drive(DriveError::LinkLost("timed out".into()));
        assert!(f
            .message()
            .starts_with("the connection was lost (timed out);"));
    }
}
