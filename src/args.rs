//! Values from the command line, the environment and standard input: addresses, codes,
//! tickets, durations; and the terminal prompt for a pairing code.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use ferry_migrate::{Candidate, CodePrompt, Error, ErrorKind, SenderChooser};
use ferry_transport::{PairingCode, Ticket};

pub fn parse_addr(s: &str) -> Result<Vec<SocketAddr>, Error> {
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| {
            Error::new(
                ErrorKind::Usage,
                format!("{s:?} is not a host:port address ({e})"),
            )
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Error::new(
            ErrorKind::Usage,
            format!("{s:?} resolves to no address"),
        ));
    }
    Ok(addrs)
}

pub fn parse_code(s: &str) -> Result<PairingCode, Error> {
    s.parse::<PairingCode>().map_err(|e| {
        // The text may come from standard input or the environment: show it escaped and short.
        let shown: String = s.chars().take(40).collect();
        Error::new(
            ErrorKind::Usage,
            format!("{shown:?} is not a pairing code ({e}); it looks like 1234-5678"),
        )
    })
}

/// A pairing code from `--code` (or `-`, or `env`).
pub fn code_arg(
    flag: Option<&str>,
    env: Option<&str>,
    stdin_taken: &mut bool,
) -> Result<Option<PairingCode>, Error> {
    secret(flag, "code", env, stdin_taken)?
        .map(|(c, _)| parse_code(&c))
        .transpose()
}

/// A ticket from `--ticket` (or `-`, or `env`).
pub fn ticket_arg(
    flag: Option<&str>,
    env: Option<&str>,
    stdin_taken: &mut bool,
) -> Result<Option<Ticket>, Error> {
    secret(flag, "ticket", env, stdin_taken)?
        .map(|(t, _)| {
            t.trim()
                .parse::<Ticket>()
                .map_err(|e| Error::new(ErrorKind::Usage, format!("bad ticket: {e}")))
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
) -> Result<Option<(String, SecretSource)>, Error> {
    use std::io::{BufRead, Read};
    match flag {
        Some("-") => {
            if *stdin_taken {
                return Err(Error::new(
                    ErrorKind::Usage,
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
                    Error::new(
                        ErrorKind::Usage,
                        format!("cannot read the {name} from standard input: {e}"),
                    )
                })?;
            let line = line.trim();
            if line.is_empty() {
                return Err(Error::new(
                    ErrorKind::Usage,
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
                Err(std::env::VarError::NotUnicode(_)) => Err(Error::new(
                    ErrorKind::Usage,
                    format!("{var} is not valid text"),
                )),
            }
        }
    }
}

/// Asks for the pairing code on the terminal (standard input, when it is one).
pub struct TerminalPrompt;

impl CodePrompt for TerminalPrompt {
    fn ask(&self, sender: &str) -> Result<PairingCode, Error> {
        prompt_code(sender)
    }
}

/// Asks on the terminal which of several senders found is the old device.
pub struct TerminalChooser;

impl SenderChooser for TerminalChooser {
    fn choose(&self, candidates: &[Candidate]) -> Result<usize, Error> {
        use std::io::{BufRead, Write};
        eprintln!("Several devices offer a history here; which one is your old device?");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for (i, c) in candidates.iter().enumerate() {
            let addrs: Vec<String> = c.addrs.iter().map(|a| a.to_string()).collect();
            eprintln!(
                "  {}) {}: seen {} s ago, {}; at {}",
                i + 1,
                crate::output::escape(&c.name),
                now.saturating_sub(c.seen_at),
                if c.paired {
                    "paired, but it no longer lets this device in (needs its code again)"
                } else {
                    "not paired with this device"
                },
                addrs.join(", ")
            );
        }
        eprintln!("Only the one you choose is asked for its code; nothing is tried on the others.");
        loop {
            eprint!("Number (1-{}): ", candidates.len());
            let _ = std::io::stderr().flush();
            let mut line = String::new();
            let n = std::io::stdin().lock().read_line(&mut line).map_err(|e| {
                Error::new(ErrorKind::Usage, format!("cannot read the choice: {e}"))
            })?;
            if n == 0 {
                return Err(Error::new(
                    ErrorKind::Usage,
                    "no sender chosen (end of input)",
                ));
            }
            match line.trim().parse::<usize>() {
                Ok(k) if (1..=candidates.len()).contains(&k) => return Ok(k - 1),
                _ => eprintln!("type one of the numbers shown"),
            }
        }
    }
}

/// Asks for the pairing code on the terminal; a line that is not a code (empty, mistyped) is
/// asked again — nothing was tried with it, so no code is used up.
pub fn prompt_code(sender: &str) -> Result<PairingCode, Error> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(Error::new(
            ErrorKind::Usage,
            "a pairing code is needed: pass --code - or --ticket - and give it on standard input, set FERRY_CODE or FERRY_TICKET, or pass --code CODE / --ticket TICKET (as shown on the old device)",
        ));
    }
    loop {
        eprint!("Pairing code shown on {}: ", crate::output::escape(sender));
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        let n = std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| Error::new(ErrorKind::Usage, format!("cannot read the code: {e}")))?;
        if n == 0 {
            return Err(Error::new(
                ErrorKind::Usage,
                "no pairing code given (end of input); run the command again and type the code shown on the old device",
            ));
        }
        match parse_code(line.trim()) {
            Ok(c) => return Ok(c),
            Err(_) if line.trim().is_empty() => {
                eprintln!("(type the 8 digits shown on the old device, like 1234-5678)")
            }
            Err(e) => eprintln!("{e}; try again (nothing was sent, the code is still valid)"),
        }
    }
}

/// A polling interval in seconds (0.05 s to one day).
pub fn parse_interval(secs: f64) -> Result<Duration, Error> {
    if !(0.05..=86_400.0).contains(&secs) {
        return Err(Error::new(
            ErrorKind::Usage,
            format!("--poll-interval {secs}: give seconds between 0.05 and 86400"),
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `--pairing-ttl DAYS` (1 to 3650).
pub fn parse_pairing_ttl(days: u32) -> Result<Duration, Error> {
    if !(1..=3650).contains(&days) {
        return Err(Error::new(
            ErrorKind::Usage,
            format!("--pairing-ttl {days}: give whole days between 1 and 3650"),
        ));
    }
    Ok(Duration::from_secs(u64::from(days) * 86_400))
}
