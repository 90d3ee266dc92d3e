//! Pieces the commands share: state directories, identity, endpoint settings, address parsing.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use ferry_transport::{
    Congestion, DeviceId, Endpoint, EndpointConfig, FerryDirs, Identity, PairingCode, PeerRecord,
    PeerStore, Ticket, DEFAULT_PAIRING_TTL,
};

use crate::exit::{Exit, Failure};

pub fn dirs() -> Result<FerryDirs, Failure> {
    FerryDirs::from_env().map_err(|e| Failure::new(Exit::Usage, e.to_string()))
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "ferry device".into())
}

/// Who is trusted without a code: how long pairings last unused (`--pairing-ttl`) and, for a
/// sender, the one device it serves (`--to`).
#[derive(Clone, Debug)]
pub struct Pinning {
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

/// `--pairing-ttl DAYS` (1 to 3650).
pub fn parse_pairing_ttl(days: u32) -> Result<Duration, Failure> {
    if !(1..=3650).contains(&days) {
        return Err(Failure::new(
            Exit::Usage,
            format!("--pairing-ttl {days}: give whole days between 1 and 3650"),
        ));
    }
    Ok(Duration::from_secs(u64::from(days) * 86_400))
}

/// The paired device `which` names: its full id, its short id or its name (which must then be
/// unique).
pub fn find_peer(store: &PeerStore, which: &str) -> Result<PeerRecord, Failure> {
    let peers = store.load().map_err(|e| {
        Failure::new(
            Exit::Internal,
            format!("cannot read the paired-devices list: {e}"),
        )
    })?;
    if let Some(p) = peers
        .iter()
        .find(|p| p.device_id.to_string() == which || p.device_id.short() == which)
    {
        return Ok(p.clone());
    }
    let named: Vec<&PeerRecord> = peers.iter().filter(|p| p.name == which).collect();
    match named.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Failure::new(
            Exit::Usage,
            format!("no paired device is called {which:?} (see `ferry peers`)"),
        )),
        many => Err(Failure::new(
            Exit::Usage,
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

/// Binds this device's endpoint (identity and peers under `dirs`).
pub fn endpoint(
    dirs: &FerryDirs,
    name: Option<&str>,
    bind: Option<SocketAddr>,
) -> Result<Endpoint, Failure> {
    endpoint_with(dirs, name, bind, Congestion::default(), &Pinning::default())
}

/// [`endpoint`] with a chosen congestion controller and pinning rules.
pub fn endpoint_with(
    dirs: &FerryDirs,
    name: Option<&str>,
    bind: Option<SocketAddr>,
    congestion: Congestion,
    pinning: &Pinning,
) -> Result<Endpoint, Failure> {
    let mut identity = Identity::load_or_create(&dirs.config, &default_name()).map_err(|e| {
        Failure::new(
            Exit::Internal,
            format!("cannot load this device's identity: {e}"),
        )
    })?;
    if let Some(n) = name {
        if n != identity.name() {
            identity.set_name(n, Some(&dirs.config)).map_err(|e| {
                Failure::new(Exit::Internal, format!("cannot save the device name: {e}"))
            })?;
        }
    }
    let peers = PeerStore::open(&dirs.config).map_err(|e| {
        Failure::new(
            Exit::Internal,
            format!("cannot open the paired-devices list: {e}"),
        )
    })?;
    let mut cfg = EndpointConfig {
        // A lost link is noticed within seconds; the receiver then reconnects on its own. The
        // keep-alive also bounds how soon a restarted sender is noticed: the receiver only
        // sends acknowledgements while data flows, so once the data stops, its next ping is
        // what draws the restarted sender's stateless reset (2 s cost 2 s per sender crash;
        // 2 pings a second cost nothing on any link).
        keep_alive: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(20),
        congestion,
        pairing_ttl: pinning.ttl,
        serve_only: pinning.serve_only,
        ..EndpointConfig::default()
    };
    if let Some(b) = bind {
        cfg.bind = b;
    }
    Endpoint::bind(identity, peers, cfg).map_err(|e| {
        Failure::new(
            Exit::Unreachable,
            format!("cannot open the network endpoint: {e}"),
        )
    })
}

pub fn parse_addr(s: &str) -> Result<Vec<SocketAddr>, Failure> {
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| {
            Failure::new(
                Exit::Usage,
                format!("{s:?} is not a host:port address ({e})"),
            )
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Failure::new(
            Exit::Usage,
            format!("{s:?} resolves to no address"),
        ));
    }
    Ok(addrs)
}

pub fn parse_code(s: &str) -> Result<PairingCode, Failure> {
    s.parse::<PairingCode>().map_err(|e| {
        // The text may come from standard input or the environment: show it escaped and short.
        let shown: String = s.chars().take(40).collect();
        Failure::new(
            Exit::Usage,
            format!("{shown:?} is not a pairing code ({e}); it looks like 1234-5678"),
        )
    })
}

/// A pairing code from `--code` (or `-`, or `env`).
pub fn code_arg(
    flag: Option<&str>,
    env: Option<&str>,
    stdin_taken: &mut bool,
) -> Result<Option<PairingCode>, Failure> {
    secret(flag, "code", env, stdin_taken)?
        .map(|(c, _)| parse_code(&c))
        .transpose()
}

/// A ticket from `--ticket` (or `-`, or `env`).
pub fn ticket_arg(
    flag: Option<&str>,
    env: Option<&str>,
    stdin_taken: &mut bool,
) -> Result<Option<Ticket>, Failure> {
    secret(flag, "ticket", env, stdin_taken)?
        .map(|(t, _)| {
            t.trim()
                .parse::<Ticket>()
                .map_err(|e| Failure::new(Exit::Usage, format!("bad ticket: {e}")))
        })
        .transpose()
}

/// Where a secret (pairing code, ticket) came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSource {
    Flag,
    Stdin,
    Env,
}

/// Longest line read from standard input for a secret.
const MAX_SECRET_LINE: u64 = 4096;

/// A secret passed as `--flag VALUE`, as `--flag -` (one line read from standard input), or,
/// when the flag is absent and `env` is given, in that environment variable. Other local users
/// can read a process's command line (`/proc/PID/cmdline`), not its standard input or
/// environment. `stdin_taken` makes sure only one secret is read from standard input.
pub fn secret(
    flag: Option<&str>,
    name: &str,
    env: Option<&str>,
    stdin_taken: &mut bool,
) -> Result<Option<(String, SecretSource)>, Failure> {
    use std::io::{BufRead, Read};
    match flag {
        Some("-") => {
            if *stdin_taken {
                return Err(Failure::new(
                    Exit::Usage,
                    "only one of --code and --ticket can be read from standard input (-)",
                ));
            }
            *stdin_taken = true;
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .take(MAX_SECRET_LINE)
                .read_line(&mut line)
                .map_err(|e| {
                    Failure::new(
                        Exit::Usage,
                        format!("cannot read the {name} from standard input: {e}"),
                    )
                })?;
            let line = line.trim();
            if line.is_empty() {
                return Err(Failure::new(
                    Exit::Usage,
                    format!("--{name} -: standard input held no {name} (give it on one line)"),
                ));
            }
            Ok(Some((line.to_string(), SecretSource::Stdin)))
        }
        Some(v) => Ok(Some((v.to_string(), SecretSource::Flag))),
        None => {
            let Some(var) = env else { return Ok(None) };
            match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => {
                    Ok(Some((v.trim().to_string(), SecretSource::Env)))
                }
                Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
                Err(std::env::VarError::NotUnicode(_)) => Err(Failure::new(
                    Exit::Usage,
                    format!("{var} is not valid text"),
                )),
            }
        }
    }
}

/// Asks for the pairing code on the terminal.
pub fn prompt_code(sender: &str) -> Result<PairingCode, Failure> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(Failure::new(
            Exit::Usage,
            "a pairing code is needed: pass --code - or --ticket - and give it on standard input, set FERRY_CODE or FERRY_TICKET, or pass --code CODE / --ticket TICKET (as shown on the old device)",
        ));
    }
    eprint!("Pairing code shown on {sender}: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| Failure::new(Exit::Usage, format!("cannot read the code: {e}")))?;
    parse_code(line.trim())
}

/// A polling interval in seconds (0.05 s to one day).
pub fn parse_interval(secs: f64) -> Result<Duration, Failure> {
    if !(0.05..=86_400.0).contains(&secs) {
        return Err(Failure::new(
            Exit::Usage,
            format!("--poll-interval {secs}: give seconds between 0.05 and 86400"),
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}
