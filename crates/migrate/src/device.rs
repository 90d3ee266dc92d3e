//! This device: its state folders, identity, paired devices and network endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_transport::{
    Congestion, DeviceId, Endpoint, EndpointConfig, FerryDirs, Identity, PeerRecord, PeerStore,
    DEFAULT_PAIRING_TTL,
};

use crate::error::{Cause, Error, ErrorKind};

/// Keep-alive of a migration's connections. A lost link is noticed within seconds; the
/// receiver then reconnects on its own. The keep-alive also bounds how soon a restarted sender
/// is noticed: the receiver only sends acknowledgements while data flows, so once the data
/// stops, its next ping is what draws the restarted sender's stateless reset (2 s cost 2 s per
/// sender crash; 2 pings a second cost nothing on any link).
pub const KEEP_ALIVE: Duration = Duration::from_millis(500);
/// A connection silent this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// The state folders: `FERRY_HOME`, else the XDG folders (see [`FerryDirs::from_env`]).
pub fn dirs_from_env() -> Result<FerryDirs, Error> {
    FerryDirs::from_env()
        .map_err(|e| Error::with_cause(ErrorKind::Usage, e.to_string(), Some(Cause::Dirs(e))))
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "ferry device".into())
}

/// Who is trusted without a code: how long pairings last unused and, for a sender, the one
/// device it serves.
#[derive(Clone, Debug)]
pub(crate) struct Pinning {
    pub ttl: Duration,
    pub serve_only: Option<DeviceId>,
}

impl Default for Pinning {
    fn default() -> Self {
        Pinning {
            ttl: DEFAULT_PAIRING_TTL,
            serve_only: None,
        }
    }
}

fn peers_error(what: &str, e: ferry_transport::PeerStoreError) -> Error {
    Error::with_cause(
        ErrorKind::Internal,
        format!("cannot {what} the paired-devices list: {e}"),
        Some(Cause::Peers(e)),
    )
}

/// Opens the paired-devices list under `dirs`.
pub fn peer_store(dirs: &FerryDirs) -> Result<PeerStore, Error> {
    PeerStore::open(&dirs.config).map_err(|e| peers_error("open", e))
}

/// The paired device `which` names: its full id, its short id or its name (which must then be
/// unique).
pub fn find_peer(store: &PeerStore, which: &str) -> Result<PeerRecord, Error> {
    let peers = store.load().map_err(|e| peers_error("read", e))?;
    if let Some(p) = peers
        .iter()
        .find(|p| p.device_id.to_string() == which || p.device_id.short() == which)
    {
        return Ok(p.clone());
    }
    let named: Vec<&PeerRecord> = peers.iter().filter(|p| p.name == which).collect();
    match named.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Error::new(
            ErrorKind::Usage,
            format!("no paired device is called {which:?} (see `ferry peers`)"),
        )),
        many => Err(Error::new(
            ErrorKind::Usage,
            format!(
                "several paired devices are called {which:?}: {}; give its id instead",
                many.iter()
                    .map(|p| p.device_id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Binds this device's endpoint (identity and peers under `dirs`) with the default rules.
pub fn open_endpoint(
    dirs: &FerryDirs,
    name: Option<&str>,
    bind: Option<SocketAddr>,
) -> Result<Endpoint, Error> {
    endpoint_with(dirs, name, bind, Congestion::default(), &Pinning::default())
}

/// [`open_endpoint`] with a chosen congestion controller and pinning rules.
pub(crate) fn endpoint_with(
    dirs: &FerryDirs,
    name: Option<&str>,
    bind: Option<SocketAddr>,
    congestion: Congestion,
    pinning: &Pinning,
) -> Result<Endpoint, Error> {
    let mut identity = Identity::load_or_create(&dirs.config, &default_name()).map_err(|e| {
        Error::with_cause(
            ErrorKind::Internal,
            format!("cannot load this device's identity: {e}"),
            Some(Cause::Identity(e)),
        )
    })?;
    if let Some(n) = name {
        if n != identity.name() {
            identity.set_name(n, Some(&dirs.config)).map_err(|e| {
                Error::with_cause(
                    ErrorKind::Internal,
                    format!("cannot save the device name: {e}"),
                    Some(Cause::Identity(e)),
                )
            })?;
        }
    }
    let peers = peer_store(dirs)?;
    let mut cfg = EndpointConfig {
        keep_alive: KEEP_ALIVE,
        idle_timeout: IDLE_TIMEOUT,
        congestion,
        pairing_ttl: pinning.ttl,
        serve_only: pinning.serve_only,
        ..EndpointConfig::default()
    };
    if let Some(b) = bind {
        cfg.bind = b;
    }
    Endpoint::bind(identity, peers, cfg).map_err(|e| {
        Error::with_cause(
            ErrorKind::Unreachable,
            format!("cannot open the network endpoint: {e}"),
            Some(Cause::Bind(e)),
        )
    })
}
