//! Finding the sender: by ticket, by address, by the key a destination remembers, or on the
//! local network; and finding it again after the link was lost or it moved.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_transport::{
    ConnectError, DeviceId, DiscoveredSender, Discovery, DiscoveryError, Endpoint, MdnsConfig,
    MdnsDiscovery, PairingCode, PairingError, PeerConnection, PeerRole,
};

use super::{ReceiveBuilder, STOPPED};
use crate::error::{Cause, Error, ErrorKind};
use crate::event::Event;
use crate::handle::Emitter;
use crate::send::stopped;
use crate::text::escape;
use crate::CodePrompt;

/// The name of the file in the destination's state folder that names its sender.
const SENDER_FILE: &str = "sender";
/// How long a first connection keeps retrying a sender that refuses new connections for now.
const REFUSED_RETRY_FOR: Duration = Duration::from_secs(30);
/// Addresses kept for reconnecting: a roaming sender adds one per move.
const MAX_SENDER_ADDRS: usize = 16;
/// How long the receiver listens for senders' local-network announcements when it looks for
/// its sender again.
const REBROWSE_FOR: Duration = Duration::from_millis(1500);
/// Paired senders tried by their keys at an address before the code is used.
const MAX_PINNED_TRIES: usize = 8;
/// How long the receiver looks for senders on the local network at first.
const BROWSE_FOR: Duration = Duration::from_secs(4);

pub(crate) fn remembered_sender(dest: &Path) -> Option<DeviceId> {
    let s = std::fs::read_to_string(super::state_dir(dest).join(SENDER_FILE)).ok()?;
    s.lines().next()?.trim().parse().ok()
}

pub(crate) fn remember_sender(dest: &Path, id: &DeviceId) {
    let _ = ferry_sync::private::write(
        &super::state_dir(dest).join(SENDER_FILE),
        format!("{id}\n").as_bytes(),
    );
}

pub(crate) fn connect_failure(e: ConnectError) -> Error {
    let (kind, message) = match &e {
        ConnectError::Pairing(PairingError::WrongCode) => (
            ErrorKind::Pairing,
            "pairing failed: the code was wrong (or someone tried to intercept the connection). \
             The old device now shows a new code; run the command again with it"
                .to_string(),
        ),
        ConnectError::Pairing(p) => (ErrorKind::Pairing, format!("pairing failed: {p}")),
        ConnectError::UnknownPeer(_) | ConnectError::NotUsable { .. } => (
            ErrorKind::Pairing,
            format!("{e}; pass the code shown by `ferry send` on that device (--code) or its --ticket"),
        ),
        other => (
            ErrorKind::Unreachable,
            format!(
                "cannot reach the sender: {other}. Check that `ferry send` is running on the old device, \
                 that both are on the same network, or use its --ticket; `ferry doctor` helps"
            ),
        ),
    };
    Error::with_cause(kind, message, Some(Cause::Connect(e)))
}

/// Runs `attempt` again, with backoff, while the sender answers but refuses new connections
/// for now (it is busy with half-finished handshakes, e.g. of this receiver's earlier runs
/// that were killed): a busy sender is not an unreachable one. Anything else is returned.
async fn unless_refused<F, Fut>(mut attempt: F) -> Result<PeerConnection, ConnectError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<PeerConnection, ConnectError>>,
{
    let until = Instant::now() + REFUSED_RETRY_FOR;
    let mut wait = Duration::from_millis(100);
    loop {
        match attempt().await {
            Err(ConnectError::Refused(why)) if Instant::now() + wait < until => {
                let why: Vec<String> = why.iter().map(|(a, e)| format!("{a}: {e}")).collect();
                tracing::info!(
                    "the sender refused a new connection for now ({}); retrying",
                    why.join("; ")
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

/// Where the sender can be reached.
pub(crate) struct SenderAt {
    /// The addresses it was reached at (the one it answered from is added once connected).
    pub(crate) addrs: Vec<SocketAddr>,
    /// Whether it was found on the local network (mDNS): then a reconnect that fails looks for
    /// it there again. A sender that moved to a new address (roaming, a new DHCP lease, a
    /// laptop that slept) announces the new one; QUIC cannot migrate the serving side, so the
    /// old connection is lost, and its pinned key tells it apart from other senders.
    browse: bool,
}

impl SenderAt {
    pub(crate) fn fixed(addrs: &[SocketAddr]) -> Self {
        SenderAt {
            addrs: addrs.to_vec(),
            browse: false,
        }
    }

    /// Adds `a` unless known (the oldest goes when there are too many); whether it was new.
    pub(crate) fn add(&mut self, a: SocketAddr) -> bool {
        if self.addrs.contains(&a) {
            return false;
        }
        if self.addrs.len() >= MAX_SENDER_ADDRS {
            self.addrs.remove(0);
        }
        self.addrs.push(a);
        true
    }
}

/// Browses the local network for ferry senders for `wait` (off the async threads).
async fn discover(wait: Duration) -> Result<Vec<DiscoveredSender>, Error> {
    let found = tokio::task::spawn_blocking(move || {
        MdnsDiscovery::new(&MdnsConfig::default())?.browse(wait)
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?;
    found.map_err(|e: DiscoveryError| {
        Error::with_cause(
            ErrorKind::Unreachable,
            format!("local-network discovery failed ({e}); use --ticket or --connect"),
            Some(Cause::Discovery(e)),
        )
    })
}

/// Asks the caller's prompt for the code shown on `sender` (off the async threads).
async fn ask_code(
    prompt: &Option<Arc<dyn CodePrompt>>,
    sender: &str,
    em: &Emitter,
) -> Result<PairingCode, Error> {
    let Some(p) = prompt.clone() else {
        return Err(Error::new(
            ErrorKind::Usage,
            format!("a pairing code is needed to pair with {}: give the code or the ticket shown by `ferry send` on the old device", escape(sender)),
        ));
    };
    em.drained().await;
    let sender = sender.to_string();
    tokio::task::spawn_blocking(move || p.ask(&sender))
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?
}

/// The first connection to the sender, and where to find it again.
/// `again`: a later attempt while waiting for the sender (its steps are not announced again).
pub(crate) async fn first_connection(
    ep: &Endpoint,
    o: &ReceiveBuilder,
    em: &Emitter,
    again: bool,
) -> Result<(PeerConnection, SenderAt), Error> {
    // Only a device paired as our sender, and not expired, is reached by its key alone.
    let usable = |id: &DeviceId| ep.usable(id, PeerRole::Sender).is_ok();
    let remembered = remembered_sender(&o.dest).filter(usable);
    if let Some(t) = &o.ticket {
        let conn = if usable(&t.device_id) {
            unless_refused(|| ep.connect_peer(t.device_id, &t.addrs)).await
        } else {
            unless_refused(|| ep.connect_ticket(t)).await
        };
        return conn
            .map(|c| (c, SenderAt::fixed(&t.addrs)))
            .map_err(connect_failure);
    }
    if let Some(addrs) = &o.connect {
        let label = addrs.first().map(|a| a.to_string()).unwrap_or_default();
        return at_address(ep, o, SenderAt::fixed(addrs), &label, remembered, em).await;
    }
    if let Some(id) = remembered {
        if !again {
            em.emit(Event::KnownSender { code_needed: false }).await;
        }
        return unless_refused(|| ep.connect_peer(id, &[]))
            .await
            .map(|c| (c, SenderAt::fixed(&[])))
            .map_err(connect_failure);
    }
    on_local_network(ep, o, em, again).await
}

/// A sender at known addresses (given, or found on the local network): by a pinned key when
/// a sender paired with this device answers there (no code needed, even when one was given),
/// else by the code (asked for when none was given). Only these addresses are used. `label`
/// names the sender in the question.
async fn at_address(
    ep: &Endpoint,
    o: &ReceiveBuilder,
    at: SenderAt,
    label: &str,
    remembered: Option<DeviceId>,
    em: &Emitter,
) -> Result<(PeerConnection, SenderAt), Error> {
    let addrs = at.addrs.clone();
    let peers = ep.peers().list();
    let verdict = match by_pinned_key(ep, remembered, &addrs).await {
        Ok(c) => {
            em.emit(Event::KnownSender { code_needed: false }).await;
            return Ok((c, at));
        }
        Err(v) => v,
    };
    if let (Some(e), None) = (verdict, o.code) {
        return Err(connect_failure(e));
    }
    let code = match o.code {
        Some(c) => c,
        None => ask_code(&o.prompt, label, em).await.map_err(|q| {
            // Nobody to ask: say why the code is needed.
            let why: Vec<String> = peers
                .iter()
                .filter_map(|p| {
                    let e = ep.usable(&p.device_id, PeerRole::Sender).err()?;
                    Some(format!("{} ({}): {e}", escape(&p.name), p.device_id.short()))
                })
                .collect();
            if !why.is_empty() {
                Error::new(
                    ErrorKind::Pairing,
                    format!(
                        "no paired device may send to this one without a code ({}); pass the code shown by `ferry send` (--code) or its --ticket",
                        why.join("; ")
                    ),
                )
            } else if !peers.is_empty() {
                Error::new(
                    ErrorKind::Pairing,
                    format!(
                        "{} is not a sender this device is paired with, so it needs the code it shows; pass it (--code) or its --ticket",
                        escape(label)
                    ),
                )
            } else {
                q
            }
        })?,
    };
    unless_refused(|| ep.connect_with_code(&addrs, code))
        .await
        .map(|c| (c, at))
        .map_err(connect_failure)
}

/// Tries the sender this destination remembers, else every sender paired with this device, at
/// `addrs` by its pinned key. Without success, why the key did not get in when that says
/// something: the paired sender refused it (it forgot this device, or never paired it this
/// way), or nothing answered.
async fn by_pinned_key(
    ep: &Endpoint,
    remembered: Option<DeviceId>,
    addrs: &[SocketAddr],
) -> Result<PeerConnection, Option<ConnectError>> {
    let pinned: Vec<DeviceId> = match remembered {
        Some(id) => vec![id],
        None => ep
            .peers()
            .list()
            .iter()
            .map(|p| p.device_id)
            .filter(|id| ep.usable(id, PeerRole::Sender).is_ok())
            .take(MAX_PINNED_TRIES)
            .collect(),
    };
    let mut verdict = None;
    for id in pinned {
        match unless_refused(|| ep.connect_peer(id, addrs)).await {
            Ok(c) => return Ok(c),
            // Another device answers there: not this paired one.
            Err(e @ ConnectError::WrongKey { .. }) => {
                tracing::info!("the paired sender {id} is not there: {e}");
            }
            // It refused this device's key, or nothing answered: no other key will do better.
            Err(e) => verdict = Some(e),
        }
    }
    Err(verdict)
}

/// The one sender on the local network, paired by the code.
async fn on_local_network(
    ep: &Endpoint,
    o: &ReceiveBuilder,
    em: &Emitter,
    again: bool,
) -> Result<(PeerConnection, SenderAt), Error> {
    if !again {
        em.emit(Event::Looking).await;
    }
    let found = discover(BROWSE_FOR).await?;
    let sender = match choose_sender(ep, o, em, found).await? {
        Chosen::Paired(d, c) => {
            em.emit(Event::Found {
                peer: d.name.clone(),
                addrs: d.addrs.clone(),
            })
            .await;
            em.emit(Event::KnownSender { code_needed: false }).await;
            let at = SenderAt {
                addrs: d.addrs.clone(),
                browse: true,
            };
            return Ok((c, at));
        }
        Chosen::Other(d) => d,
    };
    em.emit(Event::Found {
        peer: sender.name.clone(),
        addrs: sender.addrs.clone(),
    })
    .await;
    // A sender paired with this device is reached by its key, even into a new folder.
    let at = SenderAt {
        addrs: sender.addrs.clone(),
        browse: true,
    };
    at_address(ep, o, at, &sender.name, None, em).await
}

/// The sender picked among those found on the local network.
enum Chosen {
    /// A sender paired with this device, connected by its key.
    Paired(DiscoveredSender, PeerConnection),
    /// A sender to pair with by the code.
    Other(DiscoveredSender),
}

/// Picks the sender among those found: the ones `from` names (by name, or a paired device's
/// id or name); then a sender paired with this device (connected by its key: no code, and no
/// code is ever tried against a device the person did not choose); then the only one left;
/// else the person chooses ([`crate::SenderChooser`]), or the candidates are listed.
async fn choose_sender(
    ep: &Endpoint,
    o: &ReceiveBuilder,
    em: &Emitter,
    mut found: Vec<DiscoveredSender>,
) -> Result<Chosen, Error> {
    let mut pinned_only = None;
    if let Some(which) = &o.from {
        // A paired device named by its id or name is tried by its key wherever it answers.
        let paired = crate::device::find_peer(ep.peers(), which).ok();
        if let Some(p) = &paired {
            pinned_only = Some(p.device_id);
        }
        if paired.is_none() {
            found.retain(|d| d.name == *which);
        }
    }
    if found.is_empty() {
        let message = match &o.from {
            Some(w) => format!("no sender called {} found on this network; the ones found: none match (--from)", escape(w)),
            None => "no sender found on this network (multicast may be blocked). Use the ticket shown by \
                     `ferry send` (--ticket) or its address (--connect HOST:PORT); `ferry doctor` explains what is blocked".into(),
        };
        return Err(Error::new(ErrorKind::Unreachable, message));
    }
    let paired_senders = ep
        .peers()
        .list()
        .iter()
        .any(|p| ep.usable(&p.device_id, PeerRole::Sender).is_ok());
    let mut tried = 0;
    // Per sender found: when it was seen, and whether a paired device answered there but
    // refused this device's key.
    let mut seen: Vec<(u64, bool)> = Vec::new();
    // A paired sender that has only just started may miss the first look: look once more.
    for look_again in [true, false] {
        for d in &found[tried..] {
            match by_pinned_key(ep, pinned_only, &d.addrs).await {
                Ok(c) => return Ok(Chosen::Paired(d.clone(), c)),
                Err(verdict) => seen.push((unix_now(), verdict.is_some_and(|e| refused_key(&e)))),
            }
        }
        tried = found.len();
        if !(look_again && paired_senders && o.from.is_none()) {
            break;
        }
        if let Ok(more) = discover(REBROWSE_FOR).await {
            for d in more {
                if !found.iter().any(|f| f.session == d.session) {
                    found.push(d);
                }
            }
        }
    }
    if found.len() == 1 || pinned_only.is_some() {
        return Ok(Chosen::Other(found.swap_remove(0)));
    }
    let candidates: Vec<crate::Candidate> = found
        .iter()
        .zip(&seen)
        .map(|(d, &(seen_at, paired))| crate::Candidate {
            name: d.name.clone(),
            addrs: d.addrs.clone(),
            seen_at,
            paired,
        })
        .collect();
    em.emit(Event::Candidates {
        senders: candidates.clone(),
    })
    .await;
    let listed = || {
        candidates
            .iter()
            .map(|c| {
                let addrs: Vec<String> = c.addrs.iter().map(|a| a.to_string()).collect();
                format!("{} at {}", escape(&c.name), addrs.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let Some(chooser) = o.chooser.clone() else {
        return Err(Error::new(
            ErrorKind::Usage,
            format!(
                "several senders found: {}; choose one with --from NAME (or --connect HOST:PORT)",
                listed()
            ),
        ));
    };
    em.drained().await;
    let choice = tokio::task::spawn_blocking(move || chooser.choose(&candidates))
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))??;
    if choice >= found.len() {
        return Err(Error::new(ErrorKind::Usage, "no such sender"));
    }
    Ok(Chosen::Other(found.swap_remove(choice)))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a paired device's pinned key reached that device and it refused this one (rather
/// than nothing answering).
fn refused_key(e: &ConnectError) -> bool {
    !matches!(
        e,
        ConnectError::Timeout
            | ConnectError::AllFailed(_)
            | ConnectError::Refused(_)
            | ConnectError::NoAddresses
            | ConnectError::WrongKey { .. }
    )
}

/// Adds the addresses senders announce on the local network to `at` (when it was found there);
/// reports the new ones.
async fn rediscover(at: &mut SenderAt, em: &Emitter) {
    if !at.browse {
        return;
    }
    let found = match discover(REBROWSE_FOR).await {
        Ok(senders) => senders.into_iter().flat_map(|d| d.addrs).collect(),
        Err(e) => {
            tracing::info!("local-network discovery failed: {e}");
            Vec::new()
        }
    };
    let new: Vec<String> = found
        .into_iter()
        .filter(|a| at.add(*a))
        .map(|a| a.to_string())
        .collect();
    if !new.is_empty() {
        em.emit(Event::SenderFound { addrs: new }).await;
    }
}

/// One connection attempt to the sender at every known address; when it was found on the
/// local network, also looks for it there meanwhile and, when that shows new addresses,
/// starts again with them.
async fn attempt_once(
    ep: &Endpoint,
    id: DeviceId,
    at: &mut SenderAt,
    em: &Emitter,
) -> Result<PeerConnection, ConnectError> {
    let connect = |addrs: Vec<SocketAddr>| async move { ep.connect_peer(id, &addrs).await };
    let mut attempt = Box::pin(connect(at.addrs.clone()));
    if !at.browse {
        return attempt.await;
    }
    let known = at.addrs.len();
    {
        let look = rediscover(at, em);
        tokio::pin!(look);
        tokio::select! {
            r = &mut attempt => return r,
            () = &mut look => {}
        }
    }
    if at.addrs.len() != known {
        attempt = Box::pin(connect(at.addrs.clone()));
    }
    attempt.await
}

/// How long the link to the sender may be silent (not a datagram; both ends send keep-alives
/// every [`crate::device::KEEP_ALIVE`]) before the receiver tries the sender's other addresses.
const SILENT_FOR: Duration =
    Duration::from_millis(crate::device::KEEP_ALIVE.as_millis() as u64 * 6);
/// How long a try at another address may take (a handshake on a working path takes one RTT).
const PROBE_WITHIN: Duration = Duration::from_secs(3);

/// Resolves with a new connection to the sender when this one has gone silent for
/// [`SILENT_FOR`] and the sender answers at another of its addresses: it moved (roaming, a new
/// lease), and since QUIC cannot migrate the serving side the old connection would only end at
/// the idle timeout. A silent link to a sender with no other address (a blackout) is left to
/// recover by itself, keeping what is in flight. Never resolves otherwise.
pub(crate) async fn sender_elsewhere(
    ep: &Endpoint,
    id: DeviceId,
    at: &mut SenderAt,
    conn: &PeerConnection,
    em: &Emitter,
) -> PeerConnection {
    let q = conn.quinn();
    let mut seen = q.stats().udp_rx.datagrams;
    let mut heard = Instant::now();
    loop {
        tokio::time::sleep(crate::device::KEEP_ALIVE).await;
        let now = q.stats().udp_rx.datagrams;
        if now != seen || heard.elapsed() < SILENT_FOR {
            if now != seen {
                seen = now;
                heard = Instant::now();
            }
            continue;
        }
        rediscover(at, em).await;
        let current = q.remote_address();
        let others: Vec<SocketAddr> = at.addrs.iter().copied().filter(|a| *a != current).collect();
        if others.is_empty() || q.stats().udp_rx.datagrams != seen {
            continue;
        }
        let list: Vec<String> = others.iter().map(|a| a.to_string()).collect();
        tracing::info!(
            "no word from the sender for {:.0} s: trying {}",
            heard.elapsed().as_secs_f64(),
            list.join(", ")
        );
        if let Ok(Ok(c)) = tokio::time::timeout(PROBE_WITHIN, ep.connect_peer(id, &others)).await {
            return c;
        }
    }
}

/// Reconnects to the sender with back-off until `give_up` has passed without a connection (or
/// the migration is stopped).
pub(crate) async fn reconnect(
    ep: &Endpoint,
    id: DeviceId,
    at: &mut SenderAt,
    give_up: Duration,
    em: &Emitter,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<PeerConnection, Error> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = tokio::select! {
            r = attempt_once(ep, id, at, em) => r,
            () = stopped(&mut stop) => return Err(Error::new(ErrorKind::Interrupted, STOPPED)),
        };
        match attempt {
            Ok(c) => {
                at.add(c.peer().addr);
                em.emit(Event::Reconnected {
                    addr: c.peer().addr,
                })
                .await;
                return Ok(c);
            }
            Err(e) => {
                tracing::info!("reconnect failed: {e}");
                if start.elapsed() >= give_up {
                    return Err(Error::with_cause(
                        ErrorKind::Interrupted,
                        format!("the sender has been unreachable for {} s ({e}); everything verified so far is kept: run the same command to continue", give_up.as_secs()),
                        Some(Cause::Connect(e)),
                    ));
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(3));
            }
        }
    }
}
