//! The receiver an unfinished migration of a folder was being sent to, noted in the sender's
//! state folder: a sender restarted for that folder waits for it (paired: it reconnects by its
//! key, no code), and says so before offering a code to anyone else.

use std::path::{Path, PathBuf};

use ferry_transport::{DeviceId, Endpoint, FerryDirs, PeerRole};

use crate::event::WaitingFor;

fn file(dirs: &FerryDirs) -> PathBuf {
    dirs.state.join("send-unfinished")
}

fn folder(dir: &Path) -> String {
    std::fs::canonicalize(dir)
        .unwrap_or_else(|_| dir.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// Notes that `dir` is being sent to `id` (until [`finished`]).
pub(crate) fn started(dirs: &FerryDirs, dir: &Path, id: &DeviceId) {
    let text = format!("{id}\n{}\n", folder(dir));
    if let Err(e) = ferry_sync::private::write(&file(dirs), text.as_bytes()) {
        tracing::info!("cannot note the receiver in {}: {e}", file(dirs).display());
    }
}

/// The migration of `dir` ended with a verified round at its receiver.
pub(crate) fn finished(dirs: &FerryDirs) {
    let _ = std::fs::remove_file(file(dirs));
}

/// The paired receiver of an unfinished migration of `dir`, if it may still connect by its key.
pub(crate) fn awaited(dirs: &FerryDirs, dir: &Path, ep: &Endpoint) -> Option<WaitingFor> {
    let text = std::fs::read_to_string(file(dirs)).ok()?;
    let mut lines = text.lines();
    let id: DeviceId = lines.next()?.trim().parse().ok()?;
    if lines.next()? != folder(dir) {
        return None;
    }
    let rec = ep.usable(&id, PeerRole::Receiver).ok()?;
    Some(WaitingFor {
        peer: rec.name,
        device_id: id,
    })
}
